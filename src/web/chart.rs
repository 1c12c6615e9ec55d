//! Charts as inline SVG computed on the server: the pages draw without
//! JavaScript, and under a CSP that allows no inline script or style (the
//! SVG carries classes and geometry only; colours come from the
//! stylesheet). Each chart links to the data behind it.

/// One rectangle of a chart.
#[derive(Debug, Clone)]
pub struct Bar {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    /// A CSS class (series or outcome).
    pub class: String,
    /// The tooltip (`<title>`), escaped by the template.
    pub title: String,
    /// Where a click goes (empty: nowhere).
    pub href: String,
}

/// A text label on an axis.
#[derive(Debug, Clone)]
pub struct Label {
    pub x: f64,
    pub y: f64,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Chart {
    /// The accessible name.
    pub title: String,
    pub width: f64,
    pub height: f64,
    pub bars: Vec<Bar>,
    pub labels: Vec<Label>,
    /// The data behind it (a CSV or JSON URL).
    pub data_href: String,
}

const W: f64 = 960.0;
const H: f64 = 180.0;
const BOTTOM: f64 = 20.0;
const LEFT: f64 = 40.0;

/// Grouped bars per hour: jobs and returns. `rows`: (hour `YYYYMMDDhh`,
/// jobs, returns).
pub fn hourly(rows: &[(String, i64, i64)], data_href: &str) -> Chart {
    let max = rows.iter().map(|r| r.1.max(r.2)).max().unwrap_or(0).max(1) as f64;
    let n = rows.len().max(1) as f64;
    let slot = (W - LEFT) / n;
    let plot = H - BOTTOM;
    let mut bars = Vec::with_capacity(rows.len() * 2);
    let mut labels = vec![
        Label {
            x: 0.0,
            y: 12.0,
            text: format!("{max}"),
        },
        Label {
            x: 0.0,
            y: plot,
            text: "0".into(),
        },
    ];
    for (i, (hour, jobs, returns)) in rows.iter().enumerate() {
        let x = LEFT + i as f64 * slot;
        let when = if hour.len() >= 10 {
            format!(
                "{}-{}-{} {}:00",
                &hour[0..4],
                &hour[4..6],
                &hour[6..8],
                &hour[8..10]
            )
        } else {
            hour.clone()
        };
        for (k, (v, class, what)) in [
            (*jobs, "s-jobs", "jobs"),
            (*returns, "s-returns", "returns"),
        ]
        .into_iter()
        .enumerate()
        {
            let h = (v as f64 / max * (plot - 4.0)).max(if v > 0 { 1.0 } else { 0.0 });
            bars.push(Bar {
                x: x + k as f64 * slot * 0.45 + slot * 0.05,
                y: plot - h,
                w: slot * 0.42,
                h,
                class: class.into(),
                title: format!("{when}: {v} {what}"),
                href: String::new(),
            });
        }
        if i % 6 == 0 && hour.len() >= 10 && x < W - 70.0 {
            labels.push(Label {
                x,
                y: H - 4.0,
                text: format!("{}/{} {}h", &hour[6..8], &hour[4..6], &hour[8..10]),
            });
        }
    }
    Chart {
        title: "Jobs and returns per hour, last 48 hours".into(),
        width: W,
        height: H,
        bars,
        labels,
        data_href: data_href.into(),
    }
}

/// A minion's outcomes as a row of squares, oldest left; each links to
/// its job. `items`: (jid, outcome, tooltip), newest first.
pub fn timeline(items: &[(String, String, String)], minion_href: &str, data_href: &str) -> Chart {
    let n = items.len();
    let cell = 14.0;
    let gap = 3.0;
    let bars = items
        .iter()
        .rev()
        .enumerate()
        .map(|(i, (jid, outcome, tip))| Bar {
            x: i as f64 * (cell + gap),
            y: 0.0,
            w: cell,
            h: cell * 2.0,
            class: format!("o-{outcome}"),
            title: tip.clone(),
            href: format!("/job/{jid}?minion={minion_href}"),
        })
        .collect();
    Chart {
        title: format!("Outcomes of the last {n} jobs, oldest first"),
        width: (n.max(1) as f64) * (cell + gap),
        height: cell * 2.0,
        bars,
        labels: Vec::new(),
        data_href: data_href.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_value() {
        let c = hourly(
            &[("2026120100".into(), 1, 4), ("2026120101".into(), 0, 2)],
            "/data/hourly.csv",
        );
        assert_eq!(c.bars.len(), 4);
        let tallest = c.bars.iter().map(|b| b.h).fold(0.0, f64::max);
        assert!((tallest - (H - BOTTOM - 4.0)).abs() < 1e-9);
        assert_eq!(c.bars[2].h, 0.0, "a zero is no bar");
        assert_eq!(c.bars[0].title, "2026-12-01 00:00: 1 jobs");
    }
}
