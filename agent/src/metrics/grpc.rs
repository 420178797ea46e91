//! Counting gRPC messages in a body as it streams, for
//! `istio_request_messages_total` and `istio_response_messages_total`: each
//! message is a 5-byte prefix (compressed flag, 32-bit big-endian length)
//! and its bytes, and a message may span several frames or share one.

/// Where the parser stands in the length-prefixed stream.
#[derive(Debug, Default)]
pub struct MessageCounter {
    /// Prefix bytes seen of the message being started.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    pub messages: u64,
}

impl MessageCounter {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.messages += 1;
                self.remaining = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                self.prefix_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn messages_across_and_within_frames() {
        let mut stream = Vec::new();
        for len in [0, 3, 100, 1, 70_000] {
            stream.extend(message(len));
        }
        // Every split of the stream into frames counts the same five.
        for chunk in [1, 2, 4, 5, 6, 7, 64, 1000, stream.len()] {
            let mut c = MessageCounter::default();
            for frame in stream.chunks(chunk) {
                c.feed(frame);
            }
            assert_eq!(c.messages, 5, "chunks of {chunk}");
            assert_eq!((c.remaining, c.prefix_len), (0, 0));
        }
    }
}
