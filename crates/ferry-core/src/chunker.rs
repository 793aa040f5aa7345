//! Content-defined chunking with FastCDC (2020 variant).
//!
//! Boundaries depend only on the bytes near them, so an insertion moves the
//! boundaries around it and leaves the rest of the file's chunks, and their
//! ids, as they were. That is what makes a delta small.

use std::collections::VecDeque;
use std::io::Read;

use fastcdc::v2020::{FastCDC, Normalization};

use crate::config::ChunkerParams;

pub(crate) fn level(n: u8) -> Normalization {
    match n {
        0 => Normalization::Level0,
        1 => Normalization::Level1,
        2 => Normalization::Level2,
        _ => Normalization::Level3,
    }
}

/// Bytes read per refill. Large, so the unfinished tail (less than one max
/// chunk) is moved once per refill, not once per chunk.
const READ_SIZE: usize = 4 << 20;

/// Streams chunks out of `reader`; memory is bounded by the buffer (4 MiB
/// plus one max chunk).
pub struct Chunker<R: Read> {
    reader: R,
    p: ChunkerParams,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    read_size: usize,
    ready: VecDeque<Vec<u8>>,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, p: &ChunkerParams) -> Self {
        Self {
            reader,
            p: *p,
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
            read_size: 256 << 10,
            ready: VecDeque::new(),
        }
    }

    /// Cuts every chunk the buffer holds for sure: a cut before the end of
    /// the data is content-defined; the end itself is a cut only at EOF.
    fn cut_buffered(&mut self) {
        let (min, avg, max) = (
            self.p.min as usize,
            self.p.avg as usize,
            self.p.max as usize,
        );
        let cdc = FastCDC::with_level(
            &self.buf[..self.end],
            min,
            avg,
            max,
            level(self.p.normalization),
        );
        while self.start < self.end {
            let remaining = self.end - self.start;
            let (_, cut) = cdc.cut(self.start, remaining);
            if cut >= self.end && !self.eof && remaining < max {
                break;
            }
            self.ready.push_back(self.buf[self.start..cut].to_vec());
            self.start = cut;
        }
    }

    /// Reads more: 256 KiB first (small files stay cheap), doubling up to
    /// 4 MiB. The unfinished tail is moved to the front first.
    fn refill(&mut self) -> std::io::Result<()> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.truncate(self.end);
        let want = self.read_size;
        self.read_size = (self.read_size * 2).min(READ_SIZE);
        let n = (&mut self.reader)
            .take(want as u64)
            .read_to_end(&mut self.buf)?;
        self.end = self.buf.len();
        if n < want {
            self.eof = true;
        }
        Ok(())
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(c) = self.ready.pop_front() {
                return Some(Ok(c));
            }
            if self.eof && self.start >= self.end {
                return None;
            }
            if let Err(e) = self.refill() {
                self.eof = true;
                self.start = self.end;
                return Some(Err(e));
            }
            self.cut_buffered();
        }
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

    /// Same boundaries as the fastcdc crate's one-shot chunker, whatever
    /// the read sizes (a reader that returns a few bytes at a time).
    #[test]
    fn same_cuts_as_fastcdc_over_the_whole_input() {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(out.len()).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = pseudo_random(9 * 1024 * 1024 + 7, 5);
        let p = ChunkerParams::default();
        let expect: Vec<usize> = FastCDC::with_level(
            &data,
            p.min as usize,
            p.avg as usize,
            p.max as usize,
            level(p.normalization),
        )
        .map(|c| c.length)
        .collect();
        for step in [usize::MAX, 1000, 4096 * 3 + 1] {
            let got: Vec<usize> = Chunker::new(Trickle(&data, step), &p)
                .map(|c| c.unwrap().len())
                .collect();
            assert_eq!(got, expect, "read size {step}");
        }
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
        /// An insertion disturbs only the chunks near it: every chunk ending
        /// before it, and every chunk starting 32 KiB or more after it, is unchanged
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
                // A cut is decided with the byte after it: a chunk ending
                // right at the insertion may change.
                if pos + c.len() < at || pos >= at + 32 * 1024 {
                    prop_assert!(after.contains(&c), "chunk at {} lost (insertion at {})", pos, at);
                }
                pos += c.len();
            }
        }
    }
}
