//! First-fit-decreasing bin packing in O(n log n): a segment tree over the bins' remaining
//! capacities finds the leftmost bin with room for each sample in O(log n).

/// Packs items of the given lengths into bins of `capacity`: longest first, each into the first
/// bin (in opening order) with room. Returns the item indices of each bin, in placement order.
/// Ties between equal lengths keep input order, so the result is deterministic.
///
/// Panics if an item is longer than `capacity` (callers check lengths first).
pub fn first_fit_decreasing(lengths: &[u32], capacity: u32) -> Vec<Vec<usize>> {
    let n = lengths.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let size = n.next_power_of_two();
    // tree[size + i] = room left in bin i (bins not opened yet have full room); inner nodes hold
    // the maximum of their children.
    let mut tree = vec![0u32; 2 * size];
    tree[size..size + n].fill(capacity);
    for node in (1..size).rev() {
        tree[node] = tree[2 * node].max(tree[2 * node + 1]);
    }
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for item in order {
        let len = lengths[item];
        assert!(len <= capacity, "item of length {len} exceeds the bin capacity {capacity}");
        let mut node = 1;
        while node < size {
            node = if tree[2 * node] >= len { 2 * node } else { 2 * node + 1 };
        }
        let bin = node - size;
        tree[node] -= len;
        let mut up = node / 2;
        while up >= 1 {
            tree[up] = tree[2 * up].max(tree[2 * up + 1]);
            up /= 2;
        }
        if bin >= bins.len() {
            bins.resize_with(bin + 1, Vec::new);
        }
        bins[bin].push(item);
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook O(n·bins) first-fit-decreasing, to check the fast one against.
    fn naive(lengths: &[u32], capacity: u32) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
        let mut bins: Vec<(u32, Vec<usize>)> = Vec::new();
        for i in order {
            match bins.iter_mut().find(|(room, _)| *room >= lengths[i]) {
                Some((room, items)) => {
                    *room -= lengths[i];
                    items.push(i);
                }
                None => bins.push((capacity - lengths[i], vec![i])),
            }
        }
        bins.into_iter().map(|(_, items)| items).collect()
    }

    #[test]
    fn matches_the_textbook_algorithm() {
        let mut x: u64 = 12345;
        for n in [1usize, 2, 7, 100, 1000] {
            let lengths: Vec<u32> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    1 + ((x >> 33) % 512) as u32
                })
                .collect();
            assert_eq!(first_fit_decreasing(&lengths, 512), naive(&lengths, 512), "n = {n}");
        }
    }

    #[test]
    fn no_bin_overflows_and_every_item_is_placed_once() {
        let lengths: Vec<u32> = (0..500).map(|i| 1 + (i * 37 % 100) as u32).collect();
        let bins = first_fit_decreasing(&lengths, 100);
        let mut seen = vec![false; lengths.len()];
        for bin in &bins {
            assert!(bin.iter().map(|&i| lengths[i]).sum::<u32>() <= 100);
            for &i in bin {
                assert!(!seen[i]);
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }
}
