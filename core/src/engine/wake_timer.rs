//! The batcher's wake-up timer, precise to tens of microseconds.
//!
//! tokio's timer wheel rounds every deadline up to the next millisecond and its driver parks
//! in whole milliseconds, so a 0.1 ms batching delay held a lone request ~1.2 ms in the queue
//! and a 2 ms delay ~3.2 ms (measured with the model's queue statistics). Triton's delays are
//! in microseconds; ours must be too. A `timerfd` registered with the runtime's epoll fires
//! when asked (the kernel's timer slack, 50 µs by default), at the cost of one
//! `timerfd_settime` whenever the wake-up instant changes.
//!
//! Without a timerfd (it cannot be created), tokio's timer is the fallback.

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::os::fd::{AsFd as _, AsRawFd, RawFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// `TimerFd` owns its descriptor for its whole life; tokio needs it as `AsRawFd`.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct WakeTimer {
    fd: Option<AsyncFd<Timer>>,
    /// The instant the timerfd is set for, so an unchanged wake-up costs no syscall.
    armed: Option<Instant>,
}

impl WakeTimer {
    pub fn new() -> Self {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()
        .and_then(|fd| {
            // SAFETY: `Timer` owns the descriptor and returns the same one until dropped.
            unsafe { AsyncFd::register_with_interest(Timer(fd), Interest::READABLE) }.ok()
        });
        if fd.is_none() {
            tracing::debug!("no timerfd: batching delays use tokio's millisecond timer");
        }
        WakeTimer { fd, armed: None }
    }

    /// Resolves at `at` (or never, for `None`). Cancel-safe: dropping the future leaves the
    /// timer set, and the next call for the same instant waits on it without re-arming.
    pub async fn sleep_until(&mut self, at: Option<Instant>) {
        let Some(at) = at else {
            return std::future::pending().await;
        };
        let now = Instant::now();
        if at <= now {
            return;
        }
        let Some(fd) = &self.fd else {
            return tokio::time::sleep_until(at).await;
        };
        if self.armed != Some(at) {
            let after = TimeSpec::from_duration(at - now);
            if fd
                .get_ref()
                .0
                .set(Expiration::OneShot(after), TimerSetTimeFlags::empty())
                .is_err()
            {
                self.armed = None;
                return tokio::time::sleep_until(at).await;
            }
            self.armed = Some(at);
        }
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return tokio::time::sleep_until(at).await;
            };
            let mut expirations = [0u8; 8];
            match ready.try_io(|inner| {
                nix::unistd::read(inner.get_ref().0.as_fd(), &mut expirations)
                    .map_err(std::io::Error::from)
            }) {
                Ok(Ok(_)) => {
                    self.armed = None;
                    return;
                }
                // A stale readiness (the timer was re-armed after it fired): wait again.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(Err(_)) => return tokio::time::sleep_until(at).await,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_at_sub_millisecond_deadlines() {
        let mut timer = WakeTimer::new();
        assert!(timer.fd.is_some(), "timerfd is available on Linux");
        let start = Instant::now();
        timer
            .sleep_until(Some(start + Duration::from_micros(200)))
            .await;
        assert!(start.elapsed() >= Duration::from_micros(200));
    }

    #[tokio::test]
    async fn re_arming_to_a_later_instant_waits_for_the_later_one() {
        let mut timer = WakeTimer::new();
        let start = Instant::now();
        // Arm for 1 ms and abandon the wait after one poll; let that expiry pass unread, then
        // ask for 5 ms: the stale expiry must not end the second wait.
        let early = timer.sleep_until(Some(start + Duration::from_millis(1)));
        assert!(futures::FutureExt::now_or_never(early).is_none());
        tokio::time::sleep(Duration::from_millis(3)).await;
        timer
            .sleep_until(Some(start + Duration::from_millis(5)))
            .await;
        assert!(start.elapsed() >= Duration::from_millis(5));
    }

    #[tokio::test]
    async fn past_instants_return_at_once_and_none_never_does() {
        let mut timer = WakeTimer::new();
        timer.sleep_until(Some(Instant::now())).await;
        let never = timer.sleep_until(None);
        assert!(
            tokio::time::timeout(Duration::from_millis(5), never)
                .await
                .is_err()
        );
    }
}
