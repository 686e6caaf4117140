//! Process facts from `/proc`.

use std::fs;

/// State letter and start time (clock ticks since boot) of `pid`, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything; fields follow the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) the start time is field 22, i.e. 19 fields later.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Start time of `pid` in clock ticks since boot; with the pid, it identifies a process.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, t)| t)
}

/// True if `pid` exists and is not a zombie (a zombie is dead and holds nothing but its pid).
pub fn pid_is_alive(pid: u32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// True if the process `pid` that started at `start` (when known) is still alive.
pub(crate) fn owner_alive(pid: u32, start: Option<u64>) -> bool {
    match stat(pid) {
        Some((state, t)) => state != 'Z' && state != 'X' && start.is_none_or(|s| s == t),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_is_alive() {
        let me = std::process::id();
        assert!(pid_is_alive(me));
        assert!(owner_alive(me, start_time(me)));
        assert!(!owner_alive(me, start_time(me).map(|t| t + 1)));
    }
}
