//! What a stream's request body shares between the connection, which
//! receives its DATA, and the call, which reads it.
//!
//! The window is given back as the call takes the data, not as it arrives,
//! so that a call that does not read (waiting for a permit or for memory)
//! holds its client back by flow control, as h2 did.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame};

/// The connection's side of what its calls give back.
#[derive(Default)]
pub struct Returned {
    /// Bytes taken by calls, to give back to the connection's window.
    connection: AtomicUsize,
    /// Bytes taken from streams whose request has not ended, to give back
    /// to their own windows: (stream, bytes).
    streams: Mutex<Vec<(u32, usize)>>,
    /// The connection's task, woken by calls that run on tasks of their own.
    pub driver: AtomicWaker,
}

impl Returned {
    /// What calls took since the last time: the bytes for the connection,
    /// and for each stream still receiving.
    pub fn take(&self, streams: &mut Vec<(u32, usize)>) -> usize {
        let mut taken = lock(&self.streams);
        if !taken.is_empty() {
            streams.append(&mut taken);
        }
        drop(taken);
        self.connection.swap(0, Ordering::AcqRel)
    }
}

/// One stream's request body, as received and not yet taken.
pub struct Inbox {
    stream: u32,
    state: Mutex<State>,
    /// Set when the client resets the stream or the connection ends: the
    /// call is dropped unanswered.
    reset: AtomicBool,
    returned: Arc<Returned>,
}

#[derive(Default)]
struct State {
    data: VecDeque<Bytes>,
    /// END_STREAM was received.
    end: bool,
    /// The connection is done with the stream: nothing more is taken.
    closed: bool,
    /// Bytes received and not taken.
    held: usize,
    /// The reader, to wake when data, the end or a reset comes.
    reader: Option<Waker>,
    /// Whoever waits for a reset (the call's guard, or the task answering
    /// on its own, which is not always the reader's).
    watcher: Option<Waker>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still whole.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inbox {
    pub fn new(stream: u32, returned: Arc<Returned>) -> Arc<Self> {
        Arc::new(Self {
            stream,
            state: Mutex::new(State::default()),
            reset: AtomicBool::new(false),
            returned,
        })
    }

    /// Data received for the stream; `end` when it was the last.
    pub fn push(&self, data: Bytes, end: bool) {
        let mut state = lock(&self.state);
        if !data.is_empty() {
            state.held += data.len();
            state.data.push_back(data);
        }
        state.end |= end;
        if let Some(waker) = state.reader.take() {
            drop(state);
            waker.wake();
        }
    }

    /// The client reset the stream, or the connection ended.
    pub fn reset(&self) {
        self.reset.store(true, Ordering::Release);
        let (reader, watcher) = {
            let mut state = lock(&self.state);
            (state.reader.take(), state.watcher.take())
        };
        for waker in [reader, watcher].into_iter().flatten() {
            waker.wake();
        }
    }

    pub fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Acquire)
    }

    /// The connection is done with the stream: returns the bytes received
    /// and never taken, which the connection gives back itself.
    pub fn close(&self) -> usize {
        let mut state = lock(&self.state);
        state.closed = true;
        state.data.clear();
        std::mem::take(&mut state.held)
    }

    /// Remembers `cx`'s task, to be woken by a reset.
    pub fn register(&self, cx: &Context<'_>) {
        remember(&mut lock(&self.state).watcher, cx);
    }

    /// The next data, `None` at the end of the request; an error once the
    /// stream was reset.
    fn poll_data(&self, cx: &Context<'_>, wake_driver: bool) -> Poll<Option<Result<Bytes, Reset>>> {
        if self.is_reset() {
            return Poll::Ready(Some(Err(Reset)));
        }
        let mut state = lock(&self.state);
        if let Some(data) = state.data.pop_front() {
            state.held -= data.len();
            let ended = state.end;
            drop(state);
            self.returned
                .connection
                .fetch_add(data.len(), Ordering::AcqRel);
            if !ended {
                lock(&self.returned.streams).push((self.stream, data.len()));
            }
            if wake_driver {
                self.returned.driver.wake();
            }
            return Poll::Ready(Some(Ok(data)));
        }
        if state.end || state.closed {
            return Poll::Ready(None);
        }
        remember(&mut state.reader, cx);
        Poll::Pending
    }

    /// Ready once the stream is reset.
    pub async fn wait_reset(&self) {
        poll_fn(|cx| {
            if self.is_reset() {
                return Poll::Ready(());
            }
            self.register(cx);
            if self.is_reset() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

fn remember(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// The stream was reset by the client, or its connection ended.
#[derive(Debug, Clone, Copy)]
pub struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the stream was reset")
    }
}

impl std::error::Error for Reset {}

/// A request body, read from its stream's [`Inbox`].
pub struct RequestBody {
    inbox: Arc<Inbox>,
    /// Whether the reader runs on a task of its own, which must wake the
    /// connection's to give the window back (a call run by the connection's
    /// own task is followed by that at once).
    wake_driver: bool,
}

impl RequestBody {
    pub fn new(inbox: Arc<Inbox>, wake_driver: bool) -> Self {
        Self { inbox, wake_driver }
    }

    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Reset;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Reset>>> {
        self.inbox
            .poll_data(cx, self.wake_driver)
            .map(|data| data.map(|data| data.map(Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker;

    fn poll(body: &mut RequestBody) -> Poll<Option<Result<Bytes, Reset>>> {
        let waker = noop_waker();
        let cx = Context::from_waker(&waker);
        body.inbox.poll_data(&cx, false)
    }

    #[test]
    fn data_taken_is_given_back_once_by_whoever_takes_it() {
        let returned = Arc::new(Returned::default());
        let inbox = Inbox::new(5, Arc::clone(&returned));
        let mut body = RequestBody::new(Arc::clone(&inbox), false);
        assert!(poll(&mut body).is_pending());
        inbox.push(Bytes::from_static(b"abc"), false);
        inbox.push(Bytes::from_static(b"defgh"), true);
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(d))) if d == "abc"));
        let mut streams = Vec::new();
        // Taken before the end arrived? No: the end was in when it was taken,
        // so only the connection's window is owed.
        assert_eq!(returned.take(&mut streams), 3);
        assert!(streams.is_empty());
        // The rest was never taken: the connection gives it back on close.
        assert_eq!(inbox.close(), 5);
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        assert_eq!(returned.take(&mut streams), 0);
    }

    #[test]
    fn a_stream_still_receiving_is_owed_its_own_window_and_a_reset_ends_the_reading() {
        let returned = Arc::new(Returned::default());
        let inbox = Inbox::new(7, Arc::clone(&returned));
        let mut body = RequestBody::new(Arc::clone(&inbox), false);
        inbox.push(Bytes::from_static(b"1234"), false);
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(_)))));
        let mut streams = Vec::new();
        assert_eq!(returned.take(&mut streams), 4);
        assert_eq!(streams, [(7, 4)]);
        inbox.reset();
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Err(Reset)))));
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn data_wakes_the_reader_even_when_another_task_watches_for_a_reset() {
        let inbox = Inbox::new(1, Arc::new(Returned::default()));
        let (reader, watcher) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let reader_waker = Waker::from(Arc::clone(&reader));
        let watcher_waker = Waker::from(Arc::clone(&watcher));
        // The reader waits for data; then another task starts watching.
        let body = RequestBody::new(Arc::clone(&inbox), false);
        assert!(
            body.inbox
                .poll_data(&Context::from_waker(&reader_waker), false)
                .is_pending()
        );
        inbox.register(&Context::from_waker(&watcher_waker));
        inbox.push(Bytes::from_static(b"x"), true);
        assert_eq!(
            reader.0.load(Ordering::SeqCst),
            1,
            "the reader was not woken"
        );
        assert_eq!(watcher.0.load(Ordering::SeqCst), 0);
        inbox.reset();
        assert_eq!(
            watcher.0.load(Ordering::SeqCst),
            1,
            "the watcher was not woken"
        );
    }
}
