//! Burn's dashboard in a real terminal: `nsa-train` runs in a pseudo-terminal (so stdout is a
//! terminal and the dashboard starts), and the keys are typed into it. Ctrl-C saves a
//! checkpoint and exits with 130, a second Ctrl-C exits at once, and the dashboard's own stop
//! (q, then s) exits with 0 and says how to resume; the terminal is given back in every case.
#![cfg(target_os = "linux")]

mod common;

use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nsa_train::checkpoint::{checkpoint_dir, latest};
use nsa_train::metrics::read_csv;

const BIN: &str = env!("CARGO_BIN_EXE_nsa-train");

/// A pseudo-terminal: the master end (the test's keyboard and screen) and the slave end (the
/// program's terminal, kept open here to inspect its mode after the program exits).
struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
}

impl Pty {
    fn open() -> Self {
        // SAFETY: plain libc calls on descriptors owned here; every result is checked.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(master >= 0, "posix_openpt failed");
            assert_eq!(libc::grantpt(master), 0);
            assert_eq!(libc::unlockpt(master), 0);
            let mut name = [0 as libc::c_char; 256];
            assert_eq!(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), 0);
            let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            assert!(
                slave >= 0,
                "cannot open {:?}",
                CStr::from_ptr(name.as_ptr())
            );
            let size = libc::winsize {
                ws_row: 40,
                ws_col: 120,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            assert_eq!(libc::ioctl(master, libc::TIOCSWINSZ, &size), 0);
            Self {
                master: std::fs::File::from_raw_fd(master),
                slave: OwnedFd::from_raw_fd(slave),
            }
        }
    }

    /// Whether the terminal is in its normal (canonical, echoing, signal keys) mode.
    fn is_cooked(&self) -> bool {
        // SAFETY: tcgetattr on an open descriptor into a zeroed termios.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0);
            t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG)
                == libc::ICANON | libc::ECHO | libc::ISIG
        }
    }
}

/// `nsa-train` running in a pseudo-terminal, its screen output collected by a thread.
struct Session {
    pty: Pty,
    child: Child,
    screen: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Session {
    fn start(args: &[&str], cache: &Path) -> Self {
        let pty = Pty::open();
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("NSA_CACHE_DIR", cache)
            .env("TERM", "xterm-256color")
            .env_remove("NO_COLOR");
        let terminal = || Stdio::from(pty.slave.try_clone().unwrap());
        command
            .stdin(terminal())
            .stdout(terminal())
            .stderr(terminal());
        // SAFETY: setsid and ioctl are async-signal-safe; the child gets its own session with
        // the pseudo-terminal as controlling terminal (so Ctrl-C signals it).
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("nsa-train starts");
        let screen = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let mut master = pty.master.try_clone().unwrap();
        let (s, d) = (screen.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !d.load(Ordering::SeqCst) {
                let mut fds = libc::pollfd {
                    fd: master.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut fds, 1, 100) } <= 0 {
                    continue;
                }
                match master.read(&mut buf) {
                    Ok(n) if n > 0 => s.lock().unwrap().extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
        });
        Self {
            pty,
            child,
            screen,
            done,
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.pty.master.write_all(keys).unwrap();
        self.pty.master.flush().unwrap();
    }

    /// Waits for `what`, failing with the screen after `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let started = Instant::now();
        while !ready() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nsa-train exited ({status}) before {what}:\n{}",
                    self.screen()
                );
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("no {what} after {timeout:?}:\n{}", self.screen());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit code, or a failure (and a SIGKILL) after `timeout`.
    fn exit_code(&mut self, timeout: Duration) -> i32 {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // let the reader take the last output
                std::thread::sleep(Duration::from_millis(300));
                return status.code().unwrap_or(-1);
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("nsa-train still runs after {timeout:?}:\n{}", self.screen());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.done.store(true, Ordering::SeqCst);
    }
}

fn train_steps(out: &Path) -> usize {
    read_csv(&out.join("metrics.csv"))
        .map(|rows| rows.iter().filter(|r| r.split == "train").count())
        .unwrap_or(0)
}

/// A long run of the tiny test model (it has to be stopped), in the dashboard.
fn start_long_run(dir: &Path) -> (Session, PathBuf) {
    let corpus = common::small_corpus(dir, 300);
    let mut config = common::tiny_config();
    config.train.sample_every = 0;
    let config_path = dir.join("tiny.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let out = dir.join("run");
    let args = [
        "--config",
        config_path.to_str().unwrap(),
        "--data",
        corpus.to_str().unwrap(),
        "--backend",
        "cpu",
        "--steps",
        "100000",
        "--eval-every",
        "10",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut session = Session::start(&args, &dir.join("cache"));
    // the dashboard took the terminal (alternate screen) and training is under way
    let screen = session.screen.clone();
    session.wait_for("dashboard", Duration::from_secs(300), || {
        String::from_utf8_lossy(&screen.lock().unwrap()).contains("\x1b[?1049h")
    });
    session.wait_for("5 training steps", Duration::from_secs(300), || {
        train_steps(&out) >= 5
    });
    (session, out)
}

/// The output after the dashboard closed (it leaves the alternate screen).
fn after_dashboard(screen: &str) -> &str {
    screen.rfind("\x1b[?1049l").map_or("", |i| &screen[i..])
}

#[test]
fn ctrl_c_in_the_dashboard_saves_a_checkpoint_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let (mut session, out) = start_long_run(dir.path());
    session.type_keys(b"\x03");
    let code = session.exit_code(Duration::from_secs(120));
    let screen = session.screen();
    assert_eq!(code, 130, "{screen}");
    assert!(screen.contains("stopping: saving a checkpoint"), "{screen}");
    // the status panel names this loop's units (Burn's "Epoch" is an evaluation interval)
    assert!(screen.contains("Eval interval"), "{screen}");
    assert!(!screen.contains("Epoch "), "{screen}");
    let state = latest(&checkpoint_dir(&out))
        .unwrap()
        .expect("a checkpoint");
    assert!(state.step >= 5 && state.step < 100000, "{}", state.step);
    let tail = after_dashboard(&screen);
    assert!(tail.contains("interrupted"), "{screen}");
    assert!(tail.contains("--resume --out"), "{screen}");
    assert!(session.pty.is_cooked(), "the terminal was left in raw mode");
    // no noise from Burn's loggers in the run directory
    for noise in ["experiment.log", "train", "valid"] {
        assert!(!out.join(noise).exists(), "{noise} in the run directory");
    }
}

#[test]
fn a_second_ctrl_c_exits_at_once_and_gives_the_terminal_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut session, _out) = start_long_run(dir.path());
    session.type_keys(b"\x03");
    std::thread::sleep(Duration::from_millis(20));
    session.type_keys(b"\x03");
    let code = session.exit_code(Duration::from_secs(120));
    let screen = session.screen();
    assert_eq!(code, 130, "{screen}");
    assert!(
        screen.contains("stopped at once") || after_dashboard(&screen).contains("interrupted"),
        "{screen}"
    );
    assert!(
        screen.contains("\x1b[?1049l"),
        "the alternate screen was not left"
    );
    assert!(session.pty.is_cooked(), "the terminal was left in raw mode");
}

#[test]
fn q_then_s_stops_with_a_checkpoint_and_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let (mut session, out) = start_long_run(dir.path());
    session.type_keys(b"q");
    std::thread::sleep(Duration::from_millis(500));
    session.type_keys(b"s");
    let code = session.exit_code(Duration::from_secs(120));
    let screen = session.screen();
    assert_eq!(code, 0, "{screen}");
    let tail = after_dashboard(&screen);
    assert!(tail.contains("stopped from the dashboard"), "{screen}");
    let resume = format!("nsa-train --resume --out {}", out.display());
    assert!(tail.contains(&resume), "{screen}");
    assert!(tail.contains("checkpoint at step"), "{screen}");
    assert!(latest(&checkpoint_dir(&out)).unwrap().is_some());
    assert!(session.pty.is_cooked(), "the terminal was left in raw mode");
}
