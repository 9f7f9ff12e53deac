//! A small process supervisor, doing locally what a Deployment does in a
//! cluster: it starts each service, writes `<dir>/<name>.pid`, prefixes the
//! service's log lines with its name, restarts a process that dies (with
//! exponential backoff, reset once it has stayed up a while), and stops
//! everything with SIGTERM, escalating to SIGKILL after a grace period.
//! Tests use the same controls to stop, start and `kill -9` services.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};

use crate::postgres::Account;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::watch,
};

/// How long a process gets to exit after SIGTERM.
pub const GRACE: Duration = Duration::from_secs(10);
/// A process that stayed up this long is considered healthy again.
const STABLE: Duration = Duration::from_secs(10);

/// Where the services' output goes.
#[derive(Debug, Clone)]
pub enum LogSink {
    /// This process's stdout, each line prefixed with the service name.
    Stdout,
    /// `<dir>/<name>.log`, appended.
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Another account to run as (we are root, the program refuses to be).
    pub run_as: Option<Account>,
    /// What asks it to stop: SIGTERM for our services, SIGINT for PostgreSQL
    /// (its fast shutdown: SIGTERM would wait for every client to disconnect).
    pub stop_signal: Signal,
    /// A server the others use (PostgreSQL): at shutdown it is stopped only
    /// once every other process has exited, so none of them loses it while
    /// draining. It runs in a process group of its own, so a terminal's
    /// Ctrl-C (sent to the whole foreground group) does not stop it first.
    pub stops_last: bool,
}

impl ProcessSpec {
    /// `program` with no arguments, stopped by SIGTERM, as this account.
    pub fn new(name: impl Into<String>, program: PathBuf, env: Vec<(String, String)>) -> Self {
        Self { name: name.into(), program, args: Vec::new(), env, run_as: None, stop_signal: Signal::TERM, stops_last: false }
    }
}

struct Managed {
    /// Whether the process should be running.
    wanted: watch::Sender<bool>,
    /// Whether it is running now.
    running: watch::Sender<bool>,
    pid: Mutex<Option<u32>>,
    starts: Mutex<u64>,
    stops_last: bool,
}

pub struct Supervisor {
    dir: PathBuf,
    log: LogSink,
    processes: BTreeMap<String, Arc<Managed>>,
    order: Vec<String>,
}

impl Supervisor {
    /// Pid files go to `dir`.
    pub fn new(dir: PathBuf, log: LogSink) -> Self {
        Self { dir, log, processes: BTreeMap::new(), order: Vec::new() }
    }

    /// Runs `start` under a supervisor of its own (a server outside any
    /// suite, for a test); if it fails, whatever it started is stopped.
    pub async fn owning<T>(
        dir: PathBuf,
        log: LogSink,
        start: impl AsyncFnOnce(&mut Supervisor) -> std::io::Result<T>,
    ) -> std::io::Result<(T, Self)> {
        let mut supervisor = Self::new(dir, log);
        match start(&mut supervisor).await {
            Ok(value) => Ok((value, supervisor)),
            Err(e) => {
                supervisor.shutdown().await;
                Err(e)
            }
        }
    }

    /// Starts supervising (and running) `spec`.
    pub fn add(&mut self, spec: ProcessSpec) {
        let managed = Arc::new(Managed {
            wanted: watch::Sender::new(true),
            running: watch::Sender::new(false),
            pid: Mutex::new(None),
            starts: Mutex::new(0),
            stops_last: spec.stops_last,
        });
        self.order.push(spec.name.clone());
        self.processes.insert(spec.name.clone(), managed.clone());
        tokio::spawn(supervise(spec, managed, self.dir.clone(), self.log.clone()));
    }

    /// The process `name`; asking for one this supervisor was never given is
    /// a mistake in the calling test or command, so it panics naming it (the
    /// read-only [`Supervisor::pid`] and [`Supervisor::is_wanted`] answer
    /// `None`/`false` instead).
    fn get(&self, name: &str) -> &Arc<Managed> {
        self.processes.get(name).unwrap_or_else(|| panic!("no process named {name}"))
    }

    pub fn is_wanted(&self, name: &str) -> bool {
        self.processes.get(name).is_some_and(|m| *m.wanted.borrow())
    }

    /// The pid of the running process, if any (`None` too for a name this
    /// supervisor does not run, such as PostgreSQL in a suite without it).
    pub fn pid(&self, name: &str) -> Option<u32> {
        *self.processes.get(name)?.pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times the process has been started.
    ///
    /// # Panics
    /// If this supervisor runs no process `name`.
    pub fn starts(&self, name: &str) -> u64 {
        *self.get(name).starts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the process (SIGTERM, SIGKILL after [`GRACE`]) and keeps it stopped.
    ///
    /// # Panics
    /// If this supervisor runs no process `name`.
    pub async fn stop(&self, name: &str) {
        let managed = self.get(name);
        managed.wanted.send_replace(false);
        let mut running = managed.running.subscribe();
        let _ = running.wait_for(|r| !*r).await;
    }

    /// Starts a stopped process again.
    ///
    /// # Panics
    /// If this supervisor runs no process `name`.
    pub fn start(&self, name: &str) {
        self.get(name).wanted.send_replace(true);
    }

    /// Sends `signal` to the running process; a process that dies of it is
    /// restarted like any crash. Returns whether there was a process.
    pub fn signal(&self, name: &str, signal: Signal) -> bool {
        match self.pid(name) {
            Some(pid) => send(pid, signal),
            None => false,
        }
    }

    /// Waits until the process is running again with a pid other than `old`.
    pub async fn wait_restarted(&self, name: &str, old: Option<u32>, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(pid) = self.pid(name)
                && Some(pid) != old
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Stops every process, last started first, and those that
    /// [stop last](ProcessSpec::stops_last) once the others have exited.
    pub async fn shutdown(&self) {
        for last in [false, true] {
            let names: Vec<&String> = self.order.iter().rev().filter(|name| self.get(name).stops_last == last).collect();
            for name in &names {
                self.get(name).wanted.send_replace(false);
            }
            for name in names {
                self.stop(name).await;
            }
        }
    }
}

async fn supervise(spec: ProcessSpec, managed: Arc<Managed>, dir: PathBuf, log: LogSink) {
    let mut wanted = managed.wanted.subscribe();
    let pid_file = dir.join(format!("{}.pid", spec.name));
    let mut failures: u32 = 0;
    loop {
        if wanted.wait_for(|w| *w).await.is_err() {
            return;
        }
        let mut child = match spawn(&spec, &log) {
            Ok(child) => child,
            Err(e) => {
                eprintln!("[{}] cannot start {}: {e}", spec.name, spec.program.display());
                failures += 1;
                tokio::time::sleep(restart_delay(failures)).await;
                continue;
            }
        };
        let pid = child.id();
        *managed.pid.lock().unwrap_or_else(|p| p.into_inner()) = pid;
        *managed.starts.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        managed.running.send_replace(true);
        if let Some(pid) = pid {
            let _ = tokio::fs::write(&pid_file, format!("{pid}\n")).await;
        }
        let started = Instant::now();
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = wanted.wait_for(|w| !*w) => None,
        };
        match exited {
            Some(status) if *wanted.borrow() => {
                failures = if started.elapsed() > STABLE { 1 } else { failures + 1 };
                let delay = restart_delay(failures);
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                notice(&log, &spec.name, &format!("exited ({status}); restarting in {} ms", delay.as_millis())).await;
                finish(&managed, &pid_file).await;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = wanted.wait_for(|w| !*w) => {}
                }
                continue;
            }
            Some(_) => {}
            None => terminate(&mut child, pid, spec.stop_signal).await,
        }
        finish(&managed, &pid_file).await;
    }
}

async fn finish(managed: &Managed, pid_file: &PathBuf) {
    *managed.pid.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let _ = tokio::fs::remove_file(pid_file).await;
    managed.running.send_replace(false);
}

/// `signal` (SIGTERM), then SIGKILL if the process outlives [`GRACE`].
async fn terminate(child: &mut Child, pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid {
        send(pid, signal);
    }
    if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn send(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid).ok().and_then(Pid::from_raw).is_some_and(|pid| kill_process(pid, signal).is_ok())
}

/// 100 ms, doubling, at most 10 s.
fn restart_delay(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.saturating_sub(1).min(7)).min(10_000))
}

fn spawn(spec: &ProcessSpec, log: &LogSink) -> std::io::Result<Child> {
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(account) = spec.run_as {
        command.uid(account.uid).gid(account.gid);
    }
    if spec.stops_last {
        command.process_group(0);
    }
    let mut child = command.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward(out, spec.name.clone(), log.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward(err, spec.name.clone(), log.clone()));
    }
    Ok(child)
}

async fn forward(stream: impl AsyncRead + Unpin, name: String, log: LogSink) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        write_line(&log, &name, &line).await;
    }
}

async fn notice(log: &LogSink, name: &str, message: &str) {
    write_line(log, name, &format!("supervisor: {message}")).await;
}

async fn write_line(log: &LogSink, name: &str, line: &str) {
    match log {
        LogSink::Stdout => {
            let prefix =
                if std::io::stdout().is_terminal() { format!("\x1b[{}m{name:>10}\x1b[0m |", color(name)) } else { format!("{name:>10} |") };
            println!("{prefix} {line}");
        }
        LogSink::Dir(dir) => {
            let path = dir.join(format!("{name}.log"));
            if let Ok(mut file) = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await {
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
            }
        }
    }
}

fn color(name: &str) -> u8 {
    31 + (name.bytes().map(u32::from).sum::<u32>() % 6) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell that, asked to stop, waits `linger` then appends `name` to `log`;
    /// it creates `<log>.<name>` once its trap is set (a TERM before that
    /// would end it without a word).
    fn recorder(name: &str, log: &std::path::Path, linger: &str, stops_last: bool) -> ProcessSpec {
        let script =
            format!("trap 'sleep {linger}; echo {name} >> \"$LOG\"; exit 0' TERM; : > \"$LOG.{name}\"; while :; do sleep 0.05; done");
        let mut spec = ProcessSpec::new(name, PathBuf::from("/bin/sh"), vec![("LOG".into(), log.display().to_string())]);
        spec.args = vec!["-c".into(), script];
        spec.stops_last = stops_last;
        spec
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_the_others_use_stops_after_them_and_in_a_group_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stopped");
        let mut supervisor = Supervisor::new(dir.path().to_owned(), LogSink::Dir(dir.path().to_owned()));
        supervisor.add(recorder("server", &log, "0", true));
        supervisor.add(recorder("client", &log, "0.3", false));
        let deadline = Instant::now() + Duration::from_secs(10);
        let trapping = |name: &str| dir.path().join(format!("stopped.{name}")).exists();
        while supervisor.pid("server").is_none() || supervisor.pid("client").is_none() || !trapping("server") || !trapping("client") {
            assert!(Instant::now() < deadline, "both started and set their traps");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let group_of = |name: &str| {
            let pid = Pid::from_raw(i32::try_from(supervisor.pid(name).unwrap()).unwrap()).unwrap();
            rustix::process::getpgid(Some(pid)).unwrap()
        };
        let ours = rustix::process::getpgid(None).unwrap();
        assert_eq!(group_of("client"), ours, "an ordinary process shares our group");
        assert_ne!(group_of("server"), ours, "the server has a group of its own");
        supervisor.shutdown().await;
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "client\nserver\n");
        assert!(!dir.path().join("server.pid").exists() && !dir.path().join("client.pid").exists());
    }

    #[test]
    fn restart_delay_backs_off_to_ten_seconds() {
        assert_eq!(restart_delay(1), Duration::from_millis(100));
        assert_eq!(restart_delay(2), Duration::from_millis(200));
        assert_eq!(restart_delay(30), Duration::from_secs(10));
    }
}
