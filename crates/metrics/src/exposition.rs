//! OpenMetrics text → Prometheus classic text (0.0.4).
//!
//! prometheus-client only writes OpenMetrics. The classic format is what the
//! Go client (and so upstream kube-proxy) serves by default, and what
//! `promtool check metrics` parses, so `/metrics` serves it unless the
//! scraper asks for OpenMetrics. The two differ, for what this crate emits,
//! only in: the `# EOF` and `# UNIT` lines, counter family names (OpenMetrics
//! names the family without `_total`, classic names it like the sample), the
//! `unknown` type (classic: `untyped`), and how `le` boundaries are spelled
//! (`1.0` vs the Go client's `1`).

use std::collections::HashSet;

pub(crate) fn openmetrics_to_classic(om: &str) -> String {
    let counters: HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();

    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str("# HELP ");
            push_family_name(&mut out, name, &counters);
            out.push(' ');
            out.push_str(help);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            out.push_str("# TYPE ");
            push_family_name(&mut out, name, &counters);
            out.push(' ');
            out.push_str(match ty {
                "counter" | "gauge" | "histogram" | "summary" => ty,
                _ => "untyped",
            });
        } else {
            push_sample(&mut out, line);
        }
        out.push('\n');
    }
    out
}

fn push_family_name(out: &mut String, name: &str, counters: &HashSet<&str>) {
    out.push_str(name);
    if counters.contains(name) && !name.ends_with("_total") {
        out.push_str("_total");
    }
}

/// Copies a sample line, respelling `le="<n>.0"` as `le="<n>"`.
fn push_sample(out: &mut String, line: &str) {
    const LE: &str = "le=\"";
    let Some(start) = line.find(LE).map(|i| i + LE.len()) else {
        out.push_str(line);
        return;
    };
    let Some(len) = line[start..].find('"') else {
        out.push_str(line);
        return;
    };
    let value = &line[start..start + len];
    out.push_str(&line[..start]);
    out.push_str(value.strip_suffix(".0").unwrap_or(value));
    out.push_str(&line[start + len..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_counters_units_eof_and_le() {
        let om = "# HELP a_things Things.\n# TYPE a_things counter\na_things_total 3\n\
                  # HELP b_seconds Secs.\n# TYPE b_seconds histogram\n# UNIT b_seconds seconds\n\
                  b_seconds_sum 1.5\nb_seconds_count 2\nb_seconds_bucket{le=\"0.5\"} 1\n\
                  b_seconds_bucket{le=\"1.0\"} 1\nb_seconds_bucket{le=\"10.0\"} 2\n\
                  b_seconds_bucket{le=\"+Inf\"} 2\n# HELP c_total Gauge.\n# TYPE c_total gauge\n\
                  c_total{table=\"nat\"} 4\n# TYPE d unknown\nd 1\n# EOF\n";
        let want =
            "# HELP a_things_total Things.\n# TYPE a_things_total counter\na_things_total 3\n\
                    # HELP b_seconds Secs.\n# TYPE b_seconds histogram\n\
                    b_seconds_sum 1.5\nb_seconds_count 2\nb_seconds_bucket{le=\"0.5\"} 1\n\
                    b_seconds_bucket{le=\"1\"} 1\nb_seconds_bucket{le=\"10\"} 2\n\
                    b_seconds_bucket{le=\"+Inf\"} 2\n# HELP c_total Gauge.\n# TYPE c_total gauge\n\
                    c_total{table=\"nat\"} 4\n# TYPE d untyped\nd 1\n";
        assert_eq!(openmetrics_to_classic(om), want);
    }
}
