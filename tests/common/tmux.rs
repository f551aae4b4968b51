//! A private tmux server with one pane of a fixed size, to run `top` in a
//! real terminal and read its screen (`capture-pane -p`).

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A tmux server of our own (its own socket), killed on drop.
pub struct Tmux {
    socket: String,
    /// The socket's file, removed on drop.
    path: String,
}

fn tmux_cmd(socket: &str, args: &[&str]) -> Output {
    Command::new("tmux")
        .args(["-L", socket, "-f", "/dev/null"])
        .args(args)
        .env_remove("TMUX")
        .output()
        .expect("running tmux (apt-get install tmux)")
}

/// True when tmux is installed; otherwise skips.
pub fn have_tmux() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
        || super::skip("tmux is not installed (apt-get install tmux)")
}

impl Tmux {
    /// Starts a `width` x `height` pane running `sh -c script`; after the
    /// script the pane's shell waits, so its screen stays readable.
    pub fn start(width: u16, height: u16, script: &str) -> Tmux {
        static N: AtomicU32 = AtomicU32::new(0);
        let socket = format!(
            "kvmw-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let command = format!("{script}; exec sleep 600");
        let out = tmux_cmd(
            &socket,
            &[
                "new-session",
                "-d",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
                "sh",
                "-c",
                &command,
            ],
        );
        assert!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut t = Tmux {
            socket,
            path: String::new(),
        };
        t.path = t.display("#{socket_path}");
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = tmux_cmd(&self.socket, args);
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pane's screen as text.
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p"])
    }

    /// Sends keys in tmux's names (`q`, `Enter`, `C-c`, `Right`).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend(keys);
        self.run(&args);
    }

    /// A tmux format of the pane, e.g. `#{alternate_on}`.
    pub fn display(&self, format: &str) -> String {
        self.run(&["display-message", "-p", format])
            .trim()
            .to_string()
    }

    /// Resizes the pane's window.
    pub fn resize(&self, width: u16, height: u16) {
        self.run(&[
            "resize-window",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
        ]);
    }

    /// Waits (up to 30 s) until the screen satisfies `ok` and stays the same
    /// for a moment (so it is not caught halfway through a redraw), and
    /// returns it.
    pub fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if ok(&s) {
                std::thread::sleep(Duration::from_millis(30));
                if self.screen() == s {
                    return s;
                }
                continue;
            }
            assert!(Instant::now() < deadline, "never saw {what}; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of the process the pane's shell runs (the command under test).
    pub fn child_pid(&self) -> u32 {
        let shell: u32 = self.display("#{pane_pid}").parse().expect("pane pid");
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the pane's shell {shell} runs nothing"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = tmux_cmd(&self.socket, &["kill-server"]);
        if !self.path.is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
