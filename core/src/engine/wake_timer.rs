//! The batcher's wake-up timer, precise to tens of microseconds.
//!
//! tokio's timer wheel rounds every deadline up to the next millisecond and its driver parks
//! in whole milliseconds, so a 0.1 ms batching delay held a lone request ~1.2 ms in the queue
//! and a 2 ms delay ~3.2 ms (measured with the model's queue statistics). Triton's delays are
//! in microseconds; ours must be too. A `timerfd` registered with the runtime's epoll fires
//! when asked (the kernel's timer slack, 50 µs by default), at the cost of one
//! `timerfd_settime` whenever the wake-up instant changes.
//!
//! Without a timerfd (it cannot be created), tokio's timer is the fallback. Tests ask for
//! tokio's timer on purpose (`WakeClock::Tokio`): a timerfd runs on the kernel's clock and
//! ignores tokio's paused one, so a test on `start_paused` could not move a batching delay.

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

/// Which clock the batcher's wake-ups follow; chosen where the batcher is spawned
/// (`EngineOptions::wake_clock`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WakeClock {
    /// A timerfd on the kernel's monotonic clock, precise to tens of microseconds.
    #[default]
    Precise,
    /// tokio's timer: whole milliseconds, but it follows tokio's clock, so engine tests run on
    /// the paused clock and move time themselves.
    Tokio,
}

pub struct WakeTimer {
    fd: Option<AsyncFd<Timer>>,
    /// The instant the timerfd is set for, so an unchanged wake-up costs no syscall.
    armed: Option<Instant>,
}

impl WakeTimer {
    pub fn new(clock: WakeClock) -> Self {
        if clock == WakeClock::Tokio {
            return WakeTimer {
                fd: None,
                armed: None,
            };
        }
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
        let mut timer = WakeTimer::new(WakeClock::Precise);
        assert!(timer.fd.is_some(), "timerfd is available on Linux");
        let start = Instant::now();
        timer
            .sleep_until(Some(start + Duration::from_micros(200)))
            .await;
        assert!(start.elapsed() >= Duration::from_micros(200));
    }

    #[tokio::test]
    async fn re_arming_to_a_later_instant_waits_for_the_later_one() {
        let mut timer = WakeTimer::new(WakeClock::Precise);
        // Arm for 20 ms and abandon the wait after one poll; let that expiry pass unread, then
        // ask for a later instant: the stale expiry must not end the second wait. A thread
        // descheduled past the first instant before its poll finds nothing armed: try again.
        let mut early = None;
        for _ in 0..10 {
            let at = Instant::now() + Duration::from_millis(20);
            if futures::FutureExt::now_or_never(timer.sleep_until(Some(at))).is_none() {
                early = Some(at);
                break;
            }
        }
        let early = early.expect("the timer was never left armed");
        tokio::time::sleep_until(early + Duration::from_millis(5)).await;
        let later = early + Duration::from_millis(30);
        timer.sleep_until(Some(later)).await;
        assert!(Instant::now() >= later);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_a_paused_runtime() {
        let mut timer = WakeTimer::new(WakeClock::Tokio);
        let start = Instant::now();
        // An hour on the paused clock passes as soon as nothing else can run.
        timer
            .sleep_until(Some(start + Duration::from_secs(3600)))
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn past_instants_return_at_once_and_none_never_does() {
        let mut timer = WakeTimer::new(WakeClock::Precise);
        timer.sleep_until(Some(Instant::now())).await;
        let never = timer.sleep_until(None);
        assert!(
            tokio::time::timeout(Duration::from_millis(5), never)
                .await
                .is_err()
        );
    }
}
