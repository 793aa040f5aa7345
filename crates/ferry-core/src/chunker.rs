//! Content-defined chunking with FastCDC (2020 variant).
//!
//! Boundaries depend only on the bytes near them, so an insertion moves the
//! boundaries around it and leaves the rest of the file's chunks, and their
//! ids, as they were. That is what makes a delta small.

use std::io::Read;

use fastcdc::v2020::{Normalization, StreamCDC};

use crate::config::ChunkerParams;

fn level(n: u8) -> Normalization {
    match n {
        0 => Normalization::Level0,
        1 => Normalization::Level1,
        2 => Normalization::Level2,
        _ => Normalization::Level3,
    }
}

/// Streams chunks out of `reader`; memory is bounded by the max chunk size.
pub struct Chunker<R: Read> {
    inner: StreamCDC<R>,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, p: &ChunkerParams) -> Self {
        Self {
            inner: StreamCDC::with_level(
                reader,
                p.min as usize,
                p.avg as usize,
                p.max as usize,
                level(p.normalization),
            ),
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.inner.next()? {
            Ok(c) => Ok(c.data),
            Err(fastcdc::v2020::Error::IoError(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> ChunkerParams {
        ChunkerParams {
            min: 256,
            avg: 1024,
            max: 4096,
            ..ChunkerParams::default()
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn chunks(data: &[u8]) -> Vec<Vec<u8>> {
        Chunker::new(data, &params()).map(|c| c.unwrap()).collect()
    }

    #[test]
    fn concatenation_is_the_input_and_sizes_are_bounded() {
        let data = pseudo_random(200_000, 1);
        let cs = chunks(&data);
        assert_eq!(cs.concat(), data);
        for c in &cs[..cs.len() - 1] {
            assert!(c.len() >= 256 && c.len() <= 4096, "{}", c.len());
        }
        assert!(cs.len() > 100);
        assert!(chunks(&[]).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// An insertion disturbs only the chunks near it: every chunk before
        /// it, and every chunk starting 32 KiB or more after it, is unchanged
        /// (a fixed-size chunker would lose everything after it).
        #[test]
        fn boundaries_survive_insertions(seed in any::<u64>(), at in 0usize..200_000, ins in proptest::collection::vec(any::<u8>(), 1..300)) {
            let data = pseudo_random(400_000, seed);
            let mut edited = data[..at].to_vec();
            edited.extend_from_slice(&ins);
            edited.extend_from_slice(&data[at..]);
            let after: std::collections::HashSet<_> = chunks(&edited).into_iter().collect();
            let mut pos = 0;
            for c in chunks(&data) {
                if pos + c.len() <= at || pos >= at + 32 * 1024 {
                    prop_assert!(after.contains(&c), "chunk at {} lost (insertion at {})", pos, at);
                }
                pos += c.len();
            }
        }
    }
}
