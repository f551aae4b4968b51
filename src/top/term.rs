//! The terminal while `top` runs: raw mode, the alternate screen, no cursor;
//! all three undone when the [`Screen`] is dropped or the program panics,
//! so every way out leaves the terminal as it was.

use std::io::{self, Stdout};
use std::sync::Once;

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};

use super::state::Key;

/// The terminal in full-screen mode.
pub struct Screen {
    /// The ratatui terminal drawing on stdout.
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

/// Leaves full-screen mode; harmless when not in it, and errors (a terminal
/// that has gone away) are of no use to anyone at this point.
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
}

impl Screen {
    /// Enters full-screen mode.
    pub fn enter() -> anyhow::Result<Self> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        terminal::enable_raw_mode()
            .map_err(|e| anyhow::anyhow!("cannot put the terminal in raw mode: {e}"))?;
        let screen = execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())));
        match screen {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(e) => {
                restore();
                Err(anyhow::anyhow!("cannot set up the terminal: {e}"))
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// True once the terminal on stdout has hung up (e.g. its window closed).
pub fn hung_up() -> bool {
    let mut fds = [libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, no waiting.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    r > 0 && fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// The key `top` understands in a key press, if any.
pub fn key_of(k: KeyEvent) -> Option<Key> {
    if k.kind == KeyEventKind::Release {
        return None;
    }
    if k.modifiers.contains(KeyModifiers::CONTROL) {
        return matches!(k.code, KeyCode::Char('c')).then_some(Key::Interrupt);
    }
    Some(match k.code {
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::Left => Key::Left,
        KeyCode::Right => Key::Right,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::F(1) => Key::Char('?'),
        KeyCode::Char(c) => Key::Char(c),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_what_top_understands() {
        let press = |code, modifiers| key_of(KeyEvent::new(code, modifiers));
        assert_eq!(
            press(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Some(Key::Interrupt)
        );
        assert_eq!(press(KeyCode::Char('x'), KeyModifiers::CONTROL), None);
        assert_eq!(
            press(KeyCode::Char('>'), KeyModifiers::SHIFT),
            Some(Key::Char('>'))
        );
        assert_eq!(
            press(KeyCode::F(1), KeyModifiers::NONE),
            Some(Key::Char('?'))
        );
        assert_eq!(press(KeyCode::Tab, KeyModifiers::NONE), None);
    }
}
