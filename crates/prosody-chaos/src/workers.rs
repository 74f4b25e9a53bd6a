//! Ruby worker processes: `chaos/worker.rb` running `Chaos::RecordingHandler`
//! through the `prosody` runner, one consumer group member each.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::error::{Error, Result};

/// How every worker is started.
#[derive(Clone, Debug)]
pub struct WorkerSetup {
    /// The Ruby interpreter.
    pub ruby: PathBuf,
    /// The repository root (for `lib/` and `chaos/worker.rb`).
    pub repo: PathBuf,
    /// Where record and log files go.
    pub run_dir: PathBuf,
    /// The mock cluster.
    pub bootstrap_servers: String,
    /// The topic to consume.
    pub topic: String,
    /// The consumer group.
    pub group: String,
}

impl WorkerSetup {
    /// Checks that the worker script and the compiled extension are in place.
    pub fn check(&self) -> Result<()> {
        let script = self.script();
        if !script.is_file() {
            return Err(Error::Worker(format!("{} not found", script.display())));
        }
        let native = self.repo.join("lib/prosody/prosody_native.so");
        if !native.is_file() {
            return Err(Error::Worker(format!(
                "{} not found: build the extension with `rake compile` first",
                native.display()
            )));
        }
        Ok(())
    }

    fn script(&self) -> PathBuf {
        self.repo.join("chaos/worker.rb")
    }

    /// Starts worker number `instance` (numbers are never reused within a run).
    pub fn spawn(&self, instance: usize) -> Result<Worker> {
        let name = format!("worker-{instance:03}");
        let records = self.run_dir.join(format!("{name}.records"));
        let log = self.run_dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log)
            .map_err(Error::io(format!("creating {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(Error::io(format!("opening {}", log.display())))?;
        let mut command = Command::new(&self.ruby);
        command
            .arg("-I")
            .arg(self.repo.join("lib"))
            .arg(self.script())
            .args(["--brokers", &self.bootstrap_servers])
            .args(["--group", &self.group])
            .args(["--topics", &self.topic])
            .args(["--probe-port", "none"])
            .args(["--kafka", "session.timeout.ms=6000"])
            .args(["--kafka", "heartbeat.interval.ms=500"])
            .args(["--log-level", "info"])
            .env("CHAOS_RECORDS_FILE", &records)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        // Options the caller's environment may set would change the run (mock
        // mode, a different group); the command line says everything.
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("PROSODY_") {
                command.env_remove(&variable);
            }
        }
        let child = command
            .spawn()
            .map_err(Error::io(format!("starting {}", self.ruby.display())))?;
        Ok(Worker {
            instance,
            child,
            records,
            log,
        })
    }
}

/// A running (or exited, not yet reaped) worker process.
#[derive(Debug)]
pub struct Worker {
    instance: usize,
    child: Child,
    records: PathBuf,
    log: PathBuf,
}

impl Worker {
    /// The worker's number within the run.
    pub fn instance(&self) -> usize {
        self.instance
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its record file.
    pub fn records(&self) -> &Path {
        &self.records
    }

    /// Its stdout and stderr.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends SIGTERM: the runner stops gracefully.
    pub fn terminate(&self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| Error::Worker(format!("pid {} out of range", self.child.id())))?;
        // SAFETY: kill(2) has no memory-safety preconditions. The pid is our own
        // child that has not been reaped (we hold its `Child` and only reap it
        // through `try_wait`/`kill_and_reap`), so it cannot name another process.
        let result = unsafe { libc::kill(pid, libc::SIGTERM) };
        if result == 0 {
            Ok(())
        } else {
            Err(Error::io(format!(
                "sending SIGTERM to worker {}",
                self.instance
            ))(std::io::Error::last_os_error()))
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill_and_reap(&mut self) -> Result<ExitStatus> {
        // An error here means it exited already; `wait` still reaps it.
        let _ = self.child.kill();
        self.child
            .wait()
            .map_err(Error::io(format!("reaping worker {}", self.instance)))
    }

    /// Its exit status, if it has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(Error::io(format!("checking worker {}", self.instance)))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
