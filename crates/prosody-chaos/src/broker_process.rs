//! The orchestrator's handle on the `prosody-mock-broker` process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::command::BrokerCommand;
use crate::error::{Error, Result};

/// How long the broker may take to start or to answer a command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A running mock broker process.
pub struct BrokerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: Receiver<String>,
    bootstrap_servers: String,
    log: PathBuf,
}

impl BrokerProcess {
    /// Starts `exe` with `brokers` brokers and the given topics
    /// (`(name, partitions, replication)`), its stderr going to `log`, and waits
    /// for its bootstrap address.
    pub fn start(
        exe: &Path,
        brokers: i32,
        topics: &[(String, i32, i32)],
        log: &Path,
    ) -> Result<BrokerProcess> {
        let log_file =
            std::fs::File::create(log).map_err(Error::io(format!("creating {}", log.display())))?;
        let mut command = Command::new(exe);
        command.arg("--brokers").arg(brokers.to_string());
        for (name, partitions, replication) in topics {
            command
                .arg("--topic")
                .arg(format!("{name}:{partitions}:{replication}"));
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(Error::io(format!("starting {}", exe.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Broker("no stdout pipe".to_owned()))?;
        let (sender, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("mock-broker-stdout".to_owned())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(Error::io("starting the broker's reader thread"))?;
        let stdin = child.stdin.take();
        let mut broker = BrokerProcess {
            child,
            stdin,
            answers,
            bootstrap_servers: String::new(),
            log: log.to_owned(),
        };
        broker.bootstrap_servers = broker.next_answer("its bootstrap address")?;
        Ok(broker)
    }

    /// The cluster's bootstrap servers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Sends one command and waits for the broker to accept it.
    pub fn send(&mut self, command: &BrokerCommand) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Broker("already stopped".to_owned()))?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .map_err(Error::io(format!("sending `{command}` to the mock broker")))?;
        let answer = self.next_answer(&format!("its answer to `{command}`"))?;
        match answer.as_str() {
            "ok" => Ok(()),
            refusal => Err(Error::Broker(format!("`{command}` refused: {refusal}"))),
        }
    }

    /// Closes the broker's stdin and waits for it to exit.
    pub fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(Error::Broker(format!("exited with {status} when stopped")))
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(Error::Timeout(format!(
                    "the mock broker did not exit within {ANSWER_TIMEOUT:?} of its stdin closing"
                )))
                }
                Err(error) => return Err(Error::io("waiting for the mock broker")(error)),
            }
        }
    }

    fn next_answer(&mut self, what: &str) -> Result<String> {
        match self.answers.recv_timeout(ANSWER_TIMEOUT) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout(format!(
                "the mock broker did not send {what} within {ANSWER_TIMEOUT:?}"
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self
                    .child
                    .wait()
                    .map_or_else(|error| error.to_string(), |status| status.to_string());
                Err(Error::Broker(format!(
                    "exited ({status}) before sending {what}; see {}",
                    self.log.display()
                )))
            }
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
