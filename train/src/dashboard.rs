//! Burn's terminal dashboard, made to behave like a terminal program.
//!
//! Burn's TUI renderer puts the terminal in raw mode, so Ctrl-C arrives as a key event that it
//! ignores, and the training could only be stopped with q then s, or SIGTERM. [`Dashboard`]
//! wraps it:
//!
//! 1. it switches the terminal to raw mode itself, through crossterm as the dashboard does
//!    (crossterm keeps the mode from before in one place, so the dashboard's own switch is then a
//!    no-op and its exit restores the terminal as it was);
//! 2. it turns the interrupt key back on (`ISIG`): Ctrl-C sends SIGINT again, which the
//!    binary's handler turns into "save a checkpoint and stop" (a second one exits at once, see
//!    [`restore_terminal`]); the quit and suspend keys (Ctrl-\, Ctrl-Z) stay off, so the process
//!    is never stopped with the terminal in raw mode;
//! 3. it starts Burn's renderer and forwards every event to it, renaming the status panel's
//!    tags: Burn's "Epoch" is one evaluation interval (`eval_every` steps) here, its
//!    "Iteration" the global optimizer step and its "Items" the steps of the interval.
//!
//! Without the `tui` feature there is no dashboard and [`restore_terminal`] does nothing.

/// Burn's interrupter message when the dashboard's stop (q, then s) was chosen.
pub const DASHBOARD_STOP_MESSAGE: &str = "Stopping training from user input.";

/// Gives the terminal back (normal mode, main screen, cursor shown) when the process is about to
/// exit while the dashboard runs (a second Ctrl-C). Harmless when no dashboard was started.
pub fn restore_terminal() {
    #[cfg(feature = "tui")]
    if crossterm::terminal::is_raw_mode_enabled().unwrap_or(false) {
        let _ = crossterm::terminal::disable_raw_mode();
        let mut out = std::io::stdout();
        let _ = crossterm::execute!(
            out,
            crossterm::terminal::LeaveAlternateScreen,
            crossterm::cursor::Show
        );
    }
}

#[cfg(feature = "tui")]
pub use tui::Dashboard;

#[cfg(feature = "tui")]
mod tui {
    use burn::train::metric::MetricDefinition;
    use burn::train::renderer::tui::TuiMetricsRendererWrapper;
    use burn::train::renderer::{
        EvaluationName, EvaluationProgress, MetricState, MetricsRenderer,
        MetricsRendererEvaluation, MetricsRendererTraining, ProgressType, TrainingProgress,
    };
    use burn::train::{Interrupter, LearnerSummary};

    /// Burn's dashboard with Ctrl-C working and tags that name this training loop's units
    /// (see the module documentation).
    pub struct Dashboard {
        inner: TuiMetricsRendererWrapper,
    }

    impl Dashboard {
        /// Takes over the terminal (stdout must be one) and starts Burn's renderer.
        pub fn new(interrupter: Interrupter) -> Self {
            if crossterm::terminal::enable_raw_mode().is_ok() {
                interrupt_key_on();
            }
            Self {
                inner: TuiMetricsRendererWrapper::new(interrupter, None),
            }
        }
    }

    /// Sets `ISIG` on the terminal (Ctrl-C sends SIGINT) with the quit and suspend keys
    /// disabled. Best effort: without a terminal nothing changes.
    #[cfg(unix)]
    fn interrupt_key_on() {
        use rustix::termios::{
            tcgetattr, tcsetattr, LocalModes, OptionalActions, SpecialCodeIndex,
        };
        use std::io::IsTerminal;
        use std::os::fd::AsFd;
        // the terminal crossterm switched: stdin when it is one, else /dev/tty
        let tty = (!std::io::stdin().is_terminal())
            .then(|| std::fs::File::open("/dev/tty").ok())
            .flatten();
        let stdin = std::io::stdin();
        let fd = match &tty {
            Some(f) => f.as_fd(),
            None => stdin.as_fd(),
        };
        let Ok(mut ios) = tcgetattr(fd) else {
            return;
        };
        // `_POSIX_VDISABLE`
        let disabled = if cfg!(any(target_os = "linux", target_os = "android")) {
            0
        } else {
            0xff
        };
        ios.local_modes |= LocalModes::ISIG;
        ios.special_codes[SpecialCodeIndex::VQUIT] = disabled;
        ios.special_codes[SpecialCodeIndex::VSUSP] = disabled;
        let _ = tcsetattr(fd, OptionalActions::Now, &ios);
    }

    #[cfg(not(unix))]
    fn interrupt_key_on() {}

    /// Burn's tags → ours.
    fn rename(indicators: Vec<ProgressType>, items: &str) -> Vec<ProgressType> {
        let name = |tag: String| match tag.as_str() {
            "Epoch" => "Eval interval".to_string(),
            "Iteration" => "Step".to_string(),
            "Items" => items.to_string(),
            _ => tag,
        };
        indicators
            .into_iter()
            .map(|p| match p {
                ProgressType::Detailed { tag, progress } => ProgressType::Detailed {
                    tag: name(tag),
                    progress,
                },
                ProgressType::Value { tag, value } => ProgressType::Value {
                    tag: name(tag),
                    value,
                },
            })
            .collect()
    }

    impl MetricsRendererTraining for Dashboard {
        fn update_train(&mut self, state: MetricState) {
            self.inner.update_train(state)
        }
        fn update_valid(&mut self, state: MetricState) {
            self.inner.update_valid(state)
        }
        fn render_train(&mut self, item: TrainingProgress, indicators: Vec<ProgressType>) {
            self.inner
                .render_train(item, rename(indicators, "Interval steps"))
        }
        fn render_valid(&mut self, item: TrainingProgress, indicators: Vec<ProgressType>) {
            self.inner
                .render_valid(item, rename(indicators, "Validation batches"))
        }
        fn on_train_end(
            &mut self,
            summary: Option<LearnerSummary>,
        ) -> Result<(), Box<dyn std::error::Error>> {
            self.inner.on_train_end(summary)
        }
    }

    impl MetricsRendererEvaluation for Dashboard {
        fn update_test(&mut self, name: EvaluationName, state: MetricState) {
            self.inner.update_test(name, state)
        }
        fn render_test(&mut self, item: EvaluationProgress, indicators: Vec<ProgressType>) {
            self.inner.render_test(item, indicators)
        }
        fn on_test_end(
            &mut self,
            summary: Option<LearnerSummary>,
        ) -> Result<(), Box<dyn std::error::Error>> {
            self.inner.on_test_end(summary)
        }
    }

    impl MetricsRenderer for Dashboard {
        fn manual_close(&mut self) {
            self.inner.manual_close()
        }
        fn register_metric(&mut self, definition: MetricDefinition) {
            self.inner.register_metric(definition)
        }
    }
}
