//! Response rate limiting for UDP, per client prefix (a token bucket each), so spoofed queries
//! cannot turn the node into an amplifier. Over the rate, answers are dropped, and every
//! `slip`-th one goes out as an empty truncated answer: no larger than the query, and a real
//! client behind the prefix retries over TCP, which cannot be spoofed.

use std::net::IpAddr;
use std::time::Instant;

use dashmap::DashMap;
use foldhash::fast::FixedState;
use ipnet::IpNet;
use portcullis_config::file::RateLimitSection;

/// Buckets kept before idle ones are dropped (an idle bucket is full, the same as none).
const MAX_BUCKETS: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    /// Send an empty answer with TC set.
    Slip,
    Drop,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    limited: u32,
}

pub struct RateLimiter {
    rate: f64,
    slip: u32,
    v4_prefix: u8,
    v6_prefix: u8,
    exempt: Vec<IpNet>,
    buckets: DashMap<u128, Bucket, FixedState>,
}

impl RateLimiter {
    /// `None` when limiting is off.
    pub fn new(section: &RateLimitSection) -> Option<Self> {
        if section.responses_per_second == 0 {
            return None;
        }
        Some(RateLimiter {
            rate: f64::from(section.responses_per_second),
            slip: section.slip,
            v4_prefix: section.ipv4_prefix.min(32),
            v6_prefix: section.ipv6_prefix.min(128),
            exempt: section.exempt.clone(),
            buckets: DashMap::with_hasher(FixedState::default()),
        })
    }

    pub fn check(&self, client: IpAddr) -> Verdict {
        self.check_at(client, Instant::now())
    }

    fn check_at(&self, client: IpAddr, now: Instant) -> Verdict {
        let client = client.to_canonical();
        if self.exempt.iter().any(|n| n.contains(&client)) {
            return Verdict::Answer;
        }
        let key = self.prefix_key(client);
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&key) {
            self.forget_idle(now);
        }
        let mut bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: self.rate,
            last: now,
            limited: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        // The burst is one second's worth.
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Verdict::Answer;
        }
        bucket.limited = bucket.limited.wrapping_add(1);
        if self.slip > 0 && bucket.limited.is_multiple_of(self.slip) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    fn prefix_key(&self, client: IpAddr) -> u128 {
        match client {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let kept = bits
                    .checked_shr(32 - u32::from(self.v4_prefix))
                    .unwrap_or(0)
                    .checked_shl(32 - u32::from(self.v4_prefix))
                    .unwrap_or(0);
                // The IPv4-mapped range keeps the families apart.
                (0xffff_u128 << 32) | u128::from(kept)
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let shift = 128 - u32::from(self.v6_prefix);
                bits.checked_shr(shift)
                    .unwrap_or(0)
                    .checked_shl(shift)
                    .unwrap_or(0)
            }
        }
    }

    fn forget_idle(&self, now: Instant) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last).as_secs_f64() < 1.0);
        if self.buckets.len() >= MAX_BUCKETS {
            // Every bucket is busy: a flood from many prefixes. Starting over errs toward answering.
            self.buckets.clear();
        }
    }
}

/// The empty truncated answer to a query whose question ends at `question_end`.
pub fn slip_answer(request: &[u8], question_end: usize) -> Option<Vec<u8>> {
    let mut out = request.get(..question_end)?.to_vec();
    // QR and TC set, opcode and RD kept, AA cleared; RCODE 0; one question, nothing else.
    out[2] = 0x80 | (request[2] & 0x79) | 0x02;
    out[3] &= 0x10;
    out[4..6].copy_from_slice(&[0, 1]);
    out[6..12].fill(0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limiter(rate: u32, slip: u32) -> RateLimiter {
        RateLimiter::new(&RateLimitSection {
            responses_per_second: rate,
            slip,
            exempt: Vec::new(),
            ..RateLimitSection::default()
        })
        .expect("on")
    }

    #[test]
    fn over_the_rate_answers_are_dropped_and_some_slip() {
        let l = limiter(10, 2);
        let t0 = Instant::now();
        let client: IpAddr = "192.0.2.7".parse().expect("ip");
        let verdicts: Vec<Verdict> = (0..20).map(|_| l.check_at(client, t0)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Answer));
        assert_eq!(
            &verdicts[10..14],
            &[Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]
        );
        // The same /24 shares the bucket; another /24 does not.
        let neighbour: IpAddr = "192.0.2.200".parse().expect("ip");
        assert_ne!(l.check_at(neighbour, t0), Verdict::Answer);
        let other: IpAddr = "192.0.3.1".parse().expect("ip");
        assert_eq!(l.check_at(other, t0), Verdict::Answer);
        // Tokens come back with time.
        let later = t0 + Duration::from_millis(200);
        assert_eq!(l.check_at(client, later), Verdict::Answer);
        assert_eq!(l.check_at(client, later), Verdict::Answer);
        assert_ne!(l.check_at(client, later), Verdict::Answer);
    }

    #[test]
    fn exempt_networks_and_off() {
        let mut section = RateLimitSection {
            responses_per_second: 1,
            ..RateLimitSection::default()
        };
        let l = RateLimiter::new(&section).expect("on");
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        assert!((0..100).all(|_| l.check(lo) == Verdict::Answer));
        section.responses_per_second = 0;
        assert!(RateLimiter::new(&section).is_none());
    }

    #[test]
    fn slip_answer_is_no_larger_than_the_question() {
        // ID 0x1234, RD, one question `a.` A IN, and an OPT after it.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
        let end = q.len();
        q.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
        let a = slip_answer(&q, end).expect("answer");
        assert_eq!(a.len(), end);
        assert_eq!(a[2], 0x83);
        assert_eq!(&a[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
    }
}
