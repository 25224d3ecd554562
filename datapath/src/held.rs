//! Work a thread holds back while it does many things in a row, then does
//! at once: the queue wakeups of a logger commit that completes many
//! writes, the requests a ublk queue thread starts in one pass. Each user
//! has a thread-local [`Slot`]; nested holds join the outermost one.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread's held-back items: `None` while it holds nothing back.
pub(crate) type Slot<T> = RefCell<Option<Vec<T>>>;

/// Holds back items in `slot` on this thread until the returned guard is
/// dropped, which hands them to `release`.
pub(crate) fn hold<T: 'static>(slot: &'static LocalKey<Slot<T>>, release: fn(Vec<T>)) -> Guard<T> {
    let outermost = slot
        .try_with(|h| {
            let mut h = h.borrow_mut();
            let outermost = h.is_none();
            if outermost {
                *h = Some(Vec::new());
            }
            outermost
        })
        .unwrap_or(false);
    Guard {
        slot,
        release,
        outermost,
    }
}

/// Runs `f` on the items held in `slot`, if this thread holds them back.
pub(crate) fn with_held<T: 'static, R>(
    slot: &'static LocalKey<Slot<T>>,
    f: impl FnOnce(&mut Vec<T>) -> R,
) -> Option<R> {
    slot.try_with(|h| h.borrow_mut().as_mut().map(f))
        .ok()
        .flatten()
}

/// Releases what was held when dropped (the outermost guard only).
pub(crate) struct Guard<T: 'static> {
    slot: &'static LocalKey<Slot<T>>,
    release: fn(Vec<T>),
    outermost: bool,
}

impl<T: 'static> Drop for Guard<T> {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        if let Some(items) = self.slot.try_with(|h| h.borrow_mut().take()).ok().flatten() {
            (self.release)(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static SLOT: Slot<u32> = const { RefCell::new(None) };
        static RELEASED: Cell<u32> = const { Cell::new(0) };
    }

    fn release(items: Vec<u32>) {
        RELEASED.with(|r| r.set(r.get() + items.iter().sum::<u32>()));
    }

    #[test]
    fn nested_holds_release_once_at_the_outermost_end() {
        assert_eq!(with_held(&SLOT, |v| v.push(1)), None, "nothing held yet");
        let outer = hold(&SLOT, release);
        {
            let _inner = hold(&SLOT, release);
            with_held(&SLOT, |v| v.push(2)).unwrap();
        }
        assert_eq!(
            RELEASED.with(Cell::get),
            0,
            "the inner guard releases nothing"
        );
        with_held(&SLOT, |v| v.push(3)).unwrap();
        drop(outer);
        assert_eq!(RELEASED.with(Cell::get), 5);
        assert_eq!(
            with_held(&SLOT, |v| v.push(4)),
            None,
            "released and no longer held"
        );
    }
}
