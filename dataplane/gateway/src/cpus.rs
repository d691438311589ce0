//! The CPUs this process may run on (its affinity mask, as `taskset`,
//! systemd's `CPUAffinity=`, a cpuset or `isolcpus` leave it), read from
//! `/proc/self/status`, so workers are pinned inside it and never outside.

/// The CPUs the process may use, ascending; `None` when the mask cannot be
/// read (then workers are not pinned).
pub(crate) fn allowed() -> Option<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_list(list.trim())
}

/// Parse a kernel CPU list (`0-3,8,10-11`).
pub(crate) fn parse_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then_some(cpus)
}

/// The CPU for worker `i` of `workers`: the `i`-th CPU of the mask, or
/// none when pinning is off or there are more workers than CPUs to give.
pub(crate) fn for_worker(allowed: Option<&[usize]>, i: usize, workers: usize) -> Option<usize> {
    let allowed = allowed?;
    (workers <= allowed.len()).then(|| allowed[i % allowed.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_list("0"), Some(vec![0]));
        assert_eq!(parse_list("1"), Some(vec![1]));
        assert_eq!(parse_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_list("2,0-1"), Some(vec![0, 1, 2]));
        assert_eq!(parse_list(""), None);
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("x"), None);
    }

    #[test]
    fn workers_get_the_cpus_of_the_mask_not_of_the_machine() {
        let mask = [1usize, 3];
        assert_eq!(for_worker(Some(&mask), 0, 2), Some(1));
        assert_eq!(for_worker(Some(&mask), 1, 2), Some(3));
        assert_eq!(
            for_worker(Some(&mask), 0, 3),
            None,
            "more workers than CPUs"
        );
        assert_eq!(for_worker(None, 0, 1), None);
        let here = allowed().expect("/proc/self/status has Cpus_allowed_list");
        assert!(!here.is_empty());
    }
}
