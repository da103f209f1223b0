//! Per-thread free lists of I/O buffers. A client connection takes its read and write buffers
//! when bytes arrive and gives them back when it goes idle (as nginx frees its header buffers
//! on keep-alive), so a connection waiting for its next request, or an upgraded tunnel waiting
//! for its next message, holds none; an idle upstream connection in the keep-alive pool gives
//! its read buffer back the same way. Every proxy worker is one thread whose connections never
//! move, so each free list is a thread-local: no lock, no atomic.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a client connection's buffer: a typical request head, a small response with its
/// head, or one tunnel read. Buffers that grew past it (a large head) go back to the allocator.
pub const SIZE: usize = 4096;
/// Size of an upstream connection's read buffer (a response head and the start of its body).
pub const UPSTREAM_SIZE: usize = 16 * 1024;
/// Free buffers kept per worker and kind (16 x 4 KiB = 64 KiB at most): enough for the
/// requests one worker has in flight at a time on a steady load; more go back to the
/// allocator, so a burst of connections does not leave its buffers behind.
const KEEP: usize = 16;

thread_local! {
    static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static UPSTREAM: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty client read buffer with room for `SIZE` bytes.
pub fn take_read() -> BytesMut {
    take_bytes(&READ, SIZE)
}

/// Gives back a client read buffer. One that still holds bytes is dropped (they are not ours
/// to discard); one whose memory is still shared with bytes in flight, or that grew, goes back
/// to the allocator (freed when its last piece is dropped).
pub fn give_read(buf: BytesMut) {
    give_bytes(&READ, SIZE, buf)
}

/// An empty upstream read buffer with room for `UPSTREAM_SIZE` bytes.
pub fn take_upstream() -> BytesMut {
    take_bytes(&UPSTREAM, UPSTREAM_SIZE)
}

/// Gives back an upstream read buffer (as `give_read`).
pub fn give_upstream(buf: BytesMut) {
    give_bytes(&UPSTREAM, UPSTREAM_SIZE, buf)
}

type FreeList<T> = std::thread::LocalKey<RefCell<Vec<T>>>;

fn take_bytes(list: &'static FreeList<BytesMut>, size: usize) -> BytesMut {
    list.with_borrow_mut(Vec::pop).unwrap_or_else(|| BytesMut::with_capacity(size))
}

fn give_bytes(list: &'static FreeList<BytesMut>, size: usize, mut buf: BytesMut) {
    if buf.capacity() == 0 || !buf.is_empty() || !buf.try_reclaim(size) || buf.capacity() != size {
        return;
    }
    keep(list, buf);
}

/// Puts an empty buffer of the list's size on the list, unless it holds `KEEP` already.
fn keep<T>(list: &'static FreeList<T>, buf: T) {
    // At thread exit the list may be gone already: the buffer goes to the allocator.
    let _ = list.try_with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEEP {
            free.push(buf);
        }
    });
}

/// An empty write buffer with room for `SIZE` bytes.
pub fn take_write() -> Vec<u8> {
    WRITE.with_borrow_mut(Vec::pop).unwrap_or_else(|| Vec::with_capacity(SIZE))
}

/// Gives back a write buffer (its contents are discarded).
pub fn give_write(mut buf: Vec<u8>) {
    if buf.capacity() != SIZE {
        return;
    }
    buf.clear();
    keep(&WRITE, buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_empty_and_only_at_their_size() {
        let mut w = take_write();
        w.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let ptr = w.as_ptr();
        give_write(w);
        let again = take_write();
        assert_eq!((again.as_ptr(), again.len(), again.capacity()), (ptr, 0, SIZE));
        // a grown buffer goes back to the allocator
        let mut big = again;
        big.reserve(SIZE * 4);
        give_write(big);
        assert_ne!(take_write().capacity(), SIZE * 5);

        let mut r = take_read();
        r.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let _ = r.split_to(4); // the head is taken off; the buffer is unique again once it drops
        let rest = r.len();
        bytes::Buf::advance(&mut r, rest);
        give_read(r);
        let again = take_read();
        assert_eq!((again.len(), again.capacity()), (0, SIZE));
        // a buffer still shared with bytes in flight is not pooled
        let mut shared = again;
        shared.extend_from_slice(b"body");
        let piece = shared.split_to(4).freeze();
        give_read(shared);
        assert_ne!(take_read().as_ptr(), piece.as_ptr());
        assert_eq!(&piece[..], b"body");
    }
}
