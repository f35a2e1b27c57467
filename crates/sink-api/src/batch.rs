//! [`Batch`]: readings that travel together, with the [`Token`]s of the calls
//! they came from.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use smallvec::SmallVec;

use crate::{Reading, Token};

/// A batch from one source call holds one token: kept inline, it costs no
/// allocation per call.
type Tokens = SmallVec<[Token; 1]>;

/// What crosses a channel between two stages: readings that travel together,
/// and the [`Token`]s of the source calls they came from.
///
/// A batch is used as the `Vec<Reading>` it holds (it dereferences to one):
/// `len`, `iter`, `retain`, `push`, `for reading in &batch` all work as on a
/// vector. The tokens follow the readings without a stage's help as long as
/// the batch itself is moved on: forwarded with [`Output::send`](crate::Output::send),
/// merged with [`append`](Self::append), split with [`split_off`](Self::split_off),
/// or edited in place. A stage that builds a new batch from the readings of
/// another (`collect`ing an iterator) should [`carry_tokens_of`](Self::carry_tokens_of)
/// the old one; the test kit's conformance checks catch one that does not.
///
/// How a copy of a batch counts as finished, which the tokens add up:
/// - a sink finishes the batches it took when it asks its
///   [`Input`](crate::Input) for the next one (so a sink written as "take,
///   write, take the next" needs no code for acknowledgements);
/// - a batch that a processor took and dropped before asking for more counts
///   as finished too (a filter that dropped all its readings);
/// - a batch dropped while it still holds readings, anywhere else (left in a
///   channel or a buffer when shutdown cut the drain, held across a `recv` and
///   then dropped, or in hand when its stage failed), fails its tokens.
///
/// ```
/// use sink_api::testkit::readings;
/// use sink_api::{Batch, Token};
///
/// let mut merged = Batch::new();
/// for call in 0..3 {
///     let mut batch = readings("t", call * 10..call * 10 + 5);
///     batch.attach(Token::new(None));
///     merged.append(batch);
/// }
/// assert_eq!(merged.len(), 15);
/// assert_eq!(merged.tokens().len(), 3);
/// merged.retain(|reading| reading.value.and_then(|v| v.as_i64()).unwrap_or(0) % 2 == 0);
/// assert_eq!(merged.tokens().len(), 3);
/// ```
#[derive(Debug, Default)]
pub struct Batch {
    readings: Vec<Reading>,
    tokens: Tokens,
    /// Set while the batch is in the hands of the stage that took it from
    /// its input, until that stage asks for more.
    lent: Option<Lent>,
}

/// Which `recv` of which input handed a batch out.
#[derive(Debug, Clone)]
pub(crate) struct Lent {
    pub(crate) epoch: Arc<AtomicU64>,
    pub(crate) at: u64,
}

impl Lent {
    /// Whether the stage has asked its input for more since taking the batch.
    fn current(&self) -> bool {
        self.epoch.load(Ordering::Relaxed) == self.at
    }
}

impl Batch {
    /// An empty batch with no tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `capacity` readings.
    pub fn with_capacity(capacity: usize) -> Self {
        Vec::with_capacity(capacity).into()
    }

    /// Adds `token` to those this batch carries.
    pub fn attach(&mut self, token: Token) {
        self.tokens.push(token);
    }

    /// The tokens this batch carries.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// Carries the tokens of `other` too (for a batch built from another's
    /// readings); `other` keeps its own, so drop it or send it as usual.
    pub fn carry_tokens_of(&mut self, other: &Batch) {
        self.tokens.extend(other.tokens.iter().cloned());
    }

    /// Moves the readings and tokens of `other` to the end of this batch (the
    /// merge a buffering processor does).
    pub fn append(&mut self, mut other: Batch) {
        if self.readings.is_empty() && self.tokens.is_empty() {
            // Take the other whole: no copy of the readings.
            std::mem::swap(&mut self.readings, &mut other.readings);
            self.lent = other.lent.take();
        } else {
            self.readings.append(&mut other.readings);
            // Still "in hand since the last recv" only if both were.
            let same = match (&self.lent, &other.lent) {
                (Some(a), Some(b)) => Arc::ptr_eq(&a.epoch, &b.epoch) && a.at == b.at,
                _ => false,
            };
            if !same {
                self.lent = None;
            }
        }
        self.tokens.append(&mut other.tokens);
    }

    /// Splits off the readings from `at` on into a new batch; both parts
    /// carry every token, since either may hold readings of any call.
    #[must_use = "the readings split off are lost if dropped"]
    pub fn split_off(&mut self, at: usize) -> Batch {
        Batch {
            readings: self.readings.split_off(at),
            tokens: self.tokens.clone(),
            lent: self.lent.clone(),
        }
    }

    /// Marks this copy finished (written, for a sink), whatever happens to it
    /// next. Only a stage that keeps batches after asking for more needs this.
    pub fn finish(mut self) {
        self.tokens.clear();
    }

    /// Marks this copy's tokens failed: its readings were not written (a
    /// stage may still try again; the source's clients retry what failed, so
    /// delivery is at least once).
    pub fn fail(mut self) {
        for token in self.tokens.drain(..) {
            token.fail();
        }
    }

    /// The readings alone, releasing the tokens as finished.
    pub fn into_readings(mut self) -> Vec<Reading> {
        self.tokens.clear();
        std::mem::take(&mut self.readings)
    }

    /// Marks the batch as in the hands of the stage that took it with `lent`.
    pub(crate) fn lend(&mut self, lent: Lent) {
        self.lent = Some(lent);
    }

    /// Hands the batch to a channel: it is no longer any stage's to finish.
    pub(crate) fn owned(mut self) -> Self {
        self.lent = None;
        self
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.tokens.is_empty() || self.readings.is_empty() {
            return;
        }
        if self.lent.as_ref().is_some_and(Lent::current) {
            // Its input answers for it: finished when the stage asks for more.
            return;
        }
        for token in &self.tokens {
            token.fail();
        }
    }
}

impl Clone for Batch {
    /// A second copy of the readings, carrying the same tokens: both copies
    /// must be finished for the tokens to resolve as written.
    fn clone(&self) -> Self {
        Self {
            readings: self.readings.clone(),
            tokens: self.tokens.clone(),
            lent: self.lent.clone(),
        }
    }
}

impl Deref for Batch {
    type Target = Vec<Reading>;

    fn deref(&self) -> &Vec<Reading> {
        &self.readings
    }
}

impl DerefMut for Batch {
    fn deref_mut(&mut self) -> &mut Vec<Reading> {
        &mut self.readings
    }
}

impl From<Vec<Reading>> for Batch {
    fn from(readings: Vec<Reading>) -> Self {
        Self {
            readings,
            tokens: Tokens::new(),
            lent: None,
        }
    }
}

impl From<Batch> for Vec<Reading> {
    fn from(batch: Batch) -> Self {
        batch.into_readings()
    }
}

impl FromIterator<Reading> for Batch {
    fn from_iter<I: IntoIterator<Item = Reading>>(iter: I) -> Self {
        Vec::from_iter(iter).into()
    }
}

impl Extend<Reading> for Batch {
    fn extend<I: IntoIterator<Item = Reading>>(&mut self, iter: I) {
        self.readings.extend(iter);
    }
}

impl IntoIterator for Batch {
    type Item = Reading;
    type IntoIter = std::vec::IntoIter<Reading>;

    /// The readings, by value. The tokens are released as finished: a sink
    /// that writes readings one by one may consume the batch; a processor
    /// that builds a new batch from them must carry the tokens itself.
    fn into_iter(mut self) -> Self::IntoIter {
        self.tokens.clear();
        std::mem::take(&mut self.readings).into_iter()
    }
}

impl<'a> IntoIterator for &'a Batch {
    type Item = &'a Reading;
    type IntoIter = std::slice::Iter<'a, Reading>;

    fn into_iter(self) -> Self::IntoIter {
        self.readings.iter()
    }
}

impl<'a> IntoIterator for &'a mut Batch {
    type Item = &'a mut Reading;
    type IntoIter = std::slice::IterMut<'a, Reading>;

    fn into_iter(self) -> Self::IntoIter {
        self.readings.iter_mut()
    }
}

impl PartialEq for Batch {
    /// Batches are equal when their readings are; tokens are not compared.
    fn eq(&self, other: &Self) -> bool {
        self.readings == other.readings
    }
}

impl PartialEq<Vec<Reading>> for Batch {
    fn eq(&self, other: &Vec<Reading>) -> bool {
        &self.readings == other
    }
}

impl PartialEq<Batch> for Vec<Reading> {
    fn eq(&self, other: &Batch) -> bool {
        self == &other.readings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Delivery;
    use crate::testkit::readings;

    #[tokio::test]
    async fn a_batch_dropped_with_readings_fails_its_tokens() {
        let (token, acknowledgement) = Token::acknowledged(None);
        let mut batch = readings("t", 0..2);
        batch.attach(token);
        drop(batch);
        assert_eq!(acknowledgement.await, Delivery::Failed);
    }

    #[tokio::test]
    async fn an_emptied_batch_is_finished() {
        let (token, acknowledgement) = Token::acknowledged(None);
        let mut batch = readings("t", 0..2);
        batch.attach(token);
        batch.retain(|_| false);
        drop(batch);
        assert_eq!(acknowledgement.await, Delivery::Written);
    }

    #[tokio::test]
    async fn merged_and_split_batches_carry_every_token() {
        let (a, ack_a) = Token::acknowledged(None);
        let (b, ack_b) = Token::acknowledged(None);
        let mut first = readings("a", 0..2);
        first.attach(a);
        let mut second = readings("b", 0..2);
        second.attach(b);
        let mut merged = Batch::new();
        merged.append(first);
        merged.append(second);
        let tail = merged.split_off(3);
        assert_eq!((merged.len(), tail.len()), (3, 1));
        assert_eq!(tail.tokens().len(), 2);
        merged.finish();
        // The tail still holds both calls' tokens.
        tail.fail();
        assert_eq!(ack_a.await, Delivery::Failed);
        assert_eq!(ack_b.await, Delivery::Failed);
    }

    #[test]
    fn used_as_a_vector() {
        let mut batch: Batch = readings("t", 0..3);
        let first = batch[0].clone();
        batch.push(first);
        assert_eq!(batch.len(), 4);
        let names: Vec<&str> = batch.iter().map(|r| r.sensor_name.as_str()).collect();
        assert_eq!(names, ["t0", "t1", "t2", "t0"]);
        let copy: Vec<Reading> = batch.clone().into();
        assert_eq!(batch, copy);
        let mut count = 0;
        for _ in &batch {
            count += 1;
        }
        assert_eq!(count, 4);
    }
}
