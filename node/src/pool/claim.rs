//! Cluster-wide `max_conns` by claims: each serving member may have at most its *claim* of a
//! limited backend's slots in flight, the claims are gossiped (`claim:<backend>`), and a busy
//! member borrows the slots idle members lend, so one node can use the whole `max_conns` when
//! the others do not need it (before: each node at most `ceil(max_conns / nodes)`, always).
//!
//! [`next`] is one member's decision each view round (pure):
//! - A member *wants* when a request found it at its claim since the last round. It grows by
//!   its part of the slots nobody claims, `free / members`, at most once per
//!   [`GROW_EVERY_MS`]; the remainder goes to members in turn (the turn is the wall clock in
//!   [`GROW_EVERY_MS`] steps, so members agree on it as far as their clocks do). Members
//!   growing on the same view take at most `free` between them.
//! - A member that does not want keeps what it uses plus one slot (none when there are fewer
//!   slots than members), and lends the rest as soon as another member wants; with nobody
//!   wanting, every claim drifts back to the fair share (`max / members`, by rank for the
//!   remainder: the shares sum to `max_conns`).
//! - Two members that both want converge on their fair shares.
//! - A member whose claim and the others' add up to more than `max_conns` (one joined at its
//!   fair share, or the limit was lowered) gives back down to what the others leave, never
//!   below its fair share.
//!
//! The bound: claims add up to at most `max_conns` while every member sees the others'
//! claims within the growth period (a claim travels in one to three gossip rounds, 150-450 ms
//! at the default interval; claims are not hot keys, `cluster::rumor`). Slower gossip (a
//! paced large cluster) can let two members grow on views that miss each other's growth, by
//! at most their grants. A member joining starts at its fair share for the new count, so the
//! sum may exceed `max_conns` by that share until the others see it (then they give back).
//! Within a member, admission checks `in flight < claim` before the request counts, so
//! concurrent workers may overshoot by one each (as before).

/// A member grows its claim at most this often, or every three gossip intervals if longer
/// ([`grow_every_ms`]): longer than gossip takes to spread a claim.
pub const GROW_EVERY_MS: u64 = 500;

/// The growth period for a gossip interval.
pub fn grow_every_ms(gossip_interval_ms: u64) -> u64 {
    GROW_EVERY_MS.max(3 * gossip_interval_ms)
}

/// One member's claim on a limited backend, as gossiped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claim {
    /// The slots the member holds: its claim, or its requests in flight if more (a claim
    /// that shrank frees its slots only as their requests end).
    pub slots: u32,
    /// A request found the member at its claim since its previous round.
    pub wants: bool,
}

/// What one member knows at a round.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    pub max: u32,
    /// Serving members (this one included).
    pub members: u32,
    /// This member's index among the serving members in node-id order.
    pub rank: u32,
    /// Its current claim.
    pub mine: u32,
    pub in_flight: u32,
    pub wants: bool,
    /// The other serving members' claims (a member that reported none counts its fair share).
    pub others: &'a [Claim],
    /// The growth period ([`grow_every_ms`]) has passed since this member last grew.
    pub may_grow: bool,
    /// Whose turn the remainder of `free / members` is (wall-clock ms / the growth period).
    pub turn: u64,
}

/// The fair share of the member at `rank` among `members`: the shares sum to `max`.
pub fn fair(max: u32, members: u32, rank: u32) -> u32 {
    let n = members.max(1);
    max / n + u32::from(rank < max % n)
}

/// This member's claim for the next round.
pub fn next(r: &Round) -> u32 {
    let n = r.members.max(1);
    let fair = fair(r.max, n, r.rank);
    let mine = r.mine.min(r.max);
    let others = r.others.iter().fold(0u32, |sum, c| sum.saturating_add(c.slots));
    let others_want = r.others.iter().any(|c| c.wants);
    // Slots in use above a claim that shrank are still taken until their requests end.
    let free = r.max.saturating_sub(others.saturating_add(mine.max(r.in_flight)));
    let my_turn = (r.turn + u64::from(r.rank)) % u64::from(n) < u64::from(free % n);
    let grant = if r.may_grow { free / n + u32::from(my_turn) } else { 0 };
    let claim = if r.wants {
        if others_want && mine > fair {
            // Both busy: halve the distance to the fair share.
            mine - (mine - fair).div_ceil(2)
        } else {
            mine + grant
        }
    } else {
        // What is used, plus one slot when there are enough for every member to keep one
        // (with fewer slots than members, a kept slot could starve a member whose fair share
        // is 0).
        let spare = u32::from(r.max > n);
        let keep = r.in_flight.saturating_add(spare).min(r.max);
        if others_want {
            mine.min(keep)
        } else if mine > fair {
            fair.max(keep).min(mine)
        } else {
            mine + grant.min(fair - mine)
        }
    };
    // Over-committed (a member joined at its fair share, or `max_conns` was lowered): give
    // back down to what the others leave, never below the fair share. Always safe.
    if others.saturating_add(claim) > r.max && claim > fair {
        return fair.max(r.max.saturating_sub(others));
    }
    claim
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Members run `next` in lock step on each other's previous reports (every view one round
    /// old, the worst case the bound allows). `busy[i]` is how many requests member i would
    /// have in flight; requests last three rounds, so after a claim shrinks the requests above
    /// it end over three rounds (a third each round) and hold their slots until then. Returns the claims after `rounds` and the largest number
    /// of requests in flight at once, over all members.
    fn run(max: u32, busy: &[u32], start: &[u32], rounds: usize) -> (Vec<u32>, u32) {
        run_phases(max, &[(busy.to_vec(), rounds)], start)
    }

    /// [`run`] through phases of different loads, `(busy, rounds)` each.
    fn run_phases(max: u32, phases: &[(Vec<u32>, usize)], start: &[u32]) -> (Vec<u32>, u32) {
        let n = start.len() as u32;
        let schedule = phases.iter().flat_map(|(busy, rounds)| std::iter::repeat_n(busy, *rounds));
        let mut mine: Vec<u32> = start.to_vec();
        let mut reports: Vec<Claim> = start.iter().map(|&s| Claim { slots: s, wants: false }).collect();
        let mut peak = 0;
        let mut in_flight: Vec<u32> = vec![0; start.len()];
        let mut grew: Vec<Option<usize>> = vec![None; start.len()];
        for (round, busy) in schedule.enumerate() {
            // Admitted up to the claims of the previous round; above them, requests only end.
            for i in 0..in_flight.len() {
                let ending = in_flight[i].div_ceil(6);
                in_flight[i] = busy[i].min(mine[i]).max(in_flight[i] - ending);
            }
            peak = peak.max(in_flight.iter().sum());
            let mut next_reports = Vec::new();
            for i in 0..busy.len() {
                let wants = busy[i] > mine[i];
                let others: Vec<Claim> = reports.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, c)| *c).collect();
                let claim = next(&Round {
                    max,
                    members: n,
                    rank: i as u32,
                    mine: mine[i],
                    in_flight: in_flight[i],
                    wants,
                    others: &others,
                    // Rounds of 150 ms, growth at most every 500 ms: 4 rounds.
                    may_grow: grew[i].is_none_or(|g| round - g >= 4),
                    turn: round as u64 / 4,
                });
                if claim > mine[i] {
                    grew[i] = Some(round);
                }
                next_reports.push(Claim { slots: claim.max(in_flight[i]), wants });
                mine[i] = claim;
            }
            reports = next_reports;
        }
        (mine, peak)
    }

    #[test]
    fn fair_shares_sum_to_max() {
        for max in [1, 4, 6, 7, 100] {
            for n in 1..=7 {
                assert_eq!((0..n).map(|r| fair(max, n, r)).sum::<u32>(), max, "{max} / {n}");
            }
        }
    }

    #[test]
    fn one_busy_member_borrows_what_the_others_lend() {
        // 3 members of max 12 at their fair shares; only member 0 is busy.
        let (claims, peak) = run(12, &[100, 0, 0], &[4, 4, 4], 40);
        assert_eq!(claims, vec![10, 1, 1], "the idle keep one slot each");
        assert!(peak <= 12, "{peak}");
    }

    #[test]
    fn when_the_others_get_busy_the_borrower_gives_back() {
        let (claims, _) = run(12, &[100, 0, 0], &[4, 4, 4], 40);
        let (claims, peak) = run(12, &[100, 100, 100], &claims, 60);
        assert_eq!(claims, vec![4, 4, 4]);
        assert!(peak <= 12, "{peak}");
    }

    #[test]
    fn idle_members_drift_back_to_fair_shares() {
        let (claims, peak) = run(12, &[0, 0, 0], &[10, 1, 1], 40);
        assert_eq!(claims, vec![4, 4, 4]);
        assert!(peak <= 12, "{peak}");
    }

    #[test]
    fn claims_never_sum_over_max_from_any_start_and_load() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..1000 {
            let n = rng.usize(1..=5);
            let max = rng.u32(1..=20);
            // Loads that move between members every few rounds.
            let phases: Vec<(Vec<u32>, usize)> = (0..6)
                .map(|_| ((0..n).map(|_| if rng.bool() { rng.u32(0..=30) } else { 0 }).collect(), rng.usize(1..=12)))
                .collect();
            let start: Vec<u32> = (0..n as u32).map(|r| fair(max, n as u32, r)).collect();
            let (_, peak) = run_phases(max, &phases, &start);
            assert!(peak <= max, "max {max}, loads {phases:?}: {peak} requests in flight at once");
        }
    }

    #[test]
    fn fewer_slots_than_members_still_reach_the_busy_one() {
        // max 2 over 5 members: fair shares [1, 1, 0, 0, 0]; only the last has traffic.
        let (claims, peak) = run(2, &[0, 0, 0, 0, 50], &[1, 1, 0, 0, 0], 40);
        assert_eq!(claims[4], 2, "{claims:?}");
        assert!(peak <= 2);
    }

    #[test]
    fn a_borrower_gives_back_to_a_member_that_joins() {
        // Member 0 borrowed 10 of 12 from two idle members; a fourth joins at its fair share.
        let (claims, peak) = run(12, &[100, 0, 0, 0], &[10, 1, 1, 3], 40);
        assert!(claims.iter().sum::<u32>() <= 12, "{claims:?}");
        assert!(peak <= 13, "{peak}");
        // ...and the limit lowered at run time.
        let (claims, _) = run(6, &[100, 0, 0, 0], &claims, 40);
        assert!(claims.iter().sum::<u32>() <= 6, "{claims:?}");
    }

    #[test]
    fn a_limit_lowered_below_the_claim_clamps_it() {
        let r = Round {
            max: 3,
            members: 1,
            rank: 0,
            mine: 10,
            in_flight: 0,
            wants: false,
            others: &[],
            may_grow: true,
            turn: 0,
        };
        assert!(next(&r) <= 3);
    }
}
