//! Drive a `thp-target` process: spawn it, ask what its functions return.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: i32,
    /// Start of the 2 MiB text mapping.
    pub addr: u64,
    pub file: String,
}

impl Target {
    /// Start `thp-target` with `args` and wait for its `ready` line.
    pub fn spawn(args: &[&str]) -> Result<Self, String> {
        Self::spawn_as(None, args)
    }

    /// [`Target::spawn`] as user `uid` (and its group), if given.
    pub fn spawn_as(uid: Option<u32>, args: &[&str]) -> Result<Self, String> {
        Self::spawn_program("thp-target", uid, args)
    }

    /// [`Target::spawn_as`] of a `thp-target` binary at `program` (another
    /// user may not be able to reach the one on PATH: a clone under /root).
    pub fn spawn_program(program: &str, uid: Option<u32>, args: &[&str]) -> Result<Self, String> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some(uid) = uid {
            cmd.gid(uid).uid(uid);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning {program}: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut t = Self {
            child,
            stdin,
            stdout,
            pid: 0,
            addr: 0,
            file: String::new(),
        };
        t.read_ready()?;
        Ok(t)
    }

    /// Read a `ready pid=P addr=A file=F` line into `self`.
    fn read_ready(&mut self) -> Result<(), String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_string)
                .ok_or_else(|| format!("thp-target said {line:?}"))
        };
        self.pid = field("pid=")?.parse().map_err(|_| "bad pid".to_string())?;
        self.addr = crate::parse_number(&field("addr=")?).ok_or("bad addr")?;
        self.file = field("file=")?;
        Ok(())
    }

    /// Have the target exec `exe args` (an `exec-suid` command, no extra
    /// descriptors) and wait until the new image is ready.
    pub fn exec(&mut self, exe: &str, args: &[&str]) -> Result<(), String> {
        self.send(&format!("exec-suid {exe} 0 {}", args.join(" ")))?;
        self.read_ready()
    }

    /// What the function at the start of text page `page` returns now.
    pub fn call(&mut self, page: usize) -> Result<u32, String> {
        writeln!(self.stdin, "call {page}").map_err(|e| format!("target gone: {e}"))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let mut w = line.split_whitespace();
        match (w.next(), w.next().and_then(|v| v.parse().ok())) {
            (Some(n), Some(v)) if n == page.to_string() => Ok(v),
            _ => Err(format!("target answered {line:?} (did it crash?)")),
        }
    }

    /// Send one command line and return the one-line answer.
    pub fn command(&mut self, cmd: &str) -> Result<String, String> {
        writeln!(self.stdin, "{cmd}").map_err(|e| format!("target gone: {e}"))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim_end().to_string())
    }

    /// Send one command line without waiting for an answer.
    pub fn send(&mut self, cmd: &str) -> Result<(), String> {
        writeln!(self.stdin, "{cmd}").map_err(|e| format!("target gone: {e}"))
    }

    /// Wait for the target to die; the signal that killed it, if any.
    pub fn wait_signal(&mut self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.child.wait().ok()?.signal()
    }

    /// Kill the target (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Address of text page `page`.
    pub fn page_addr(&self, page: usize) -> u64 {
        self.addr + (page * crate::testkit::text::PAGE) as u64
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
