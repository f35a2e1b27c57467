//! `sink top --api ADDRESS`: a live view of a running sink, read each second
//! from its `/metrics`: per stage its readings per second in and out, how
//! full its input channel is, its errors and its dropped readings; gRPC calls by status; reloads.
//!
//! On a terminal it draws with ratatui (alternate screen, restored on exit,
//! `q` or Ctrl-C quits); otherwise it prints plain lines each second.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

/// How often the view refreshes.
const PERIOD: Duration = Duration::from_secs(1);
/// The longest one scrape may take.
const FETCH_TIMEOUT: Duration = Duration::from_millis(900);
/// The largest `/metrics` answer read.
const MAX_BODY: u64 = 16 << 20;

/// GETs `path` from the HTTP server at `address` (HTTP/1.0, so the answer is
/// neither chunked nor kept alive), with `accept` as the Accept header.
/// Returns the status code and the body.
pub fn fetch(address: &str, path: &str, accept: Option<&str>) -> io::Result<(u16, String)> {
    let target = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, FETCH_TIMEOUT)?;
    stream.set_read_timeout(Some(FETCH_TIMEOUT))?;
    stream.set_write_timeout(Some(FETCH_TIMEOUT))?;
    let accept = accept.map_or_else(String::new, |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.take(MAX_BODY).read_to_string(&mut answer)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

/// One sample of the text exposition: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, with its `_total`/`_bucket` suffix.
    pub name: String,
    /// Its labels, in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if it has one.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a Prometheus or OpenMetrics text exposition; lines it cannot read
/// (comments, and anything malformed) are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    // A quoted value with \\, \" and \n escapes.
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        };
        rest = &inner[end + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// One scrape and when it was taken.
struct Scrape {
    samples: Vec<Sample>,
    at: Instant,
}

impl Scrape {
    /// The sum of `name`'s samples that `keep` accepts.
    fn sum(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && keep(s))
            .map(|s| s.value)
            // Not `sum()`, whose empty sum is -0.
            .fold(0.0, |total, value| total + value)
    }

    fn stage_value(&self, name: &str, stage: &str) -> f64 {
        self.sum(name, |s| s.label("stage") == Some(stage))
    }
}

/// What the view shows, computed from two scrapes.
#[derive(Debug, Default, PartialEq)]
pub struct View {
    /// One row per stage, in the order the sink lists them.
    pub stages: Vec<StageRow>,
    /// gRPC calls by status: total, and per second.
    pub calls: Vec<(String, f64, f64)>,
    /// Reloads by outcome.
    pub reloads: Vec<(String, f64)>,
    /// The outcome of the last reload seen while watching.
    pub last_reload: Option<String>,
}

/// One stage's line.
#[derive(Debug, Default, PartialEq)]
pub struct StageRow {
    /// Its id.
    pub id: String,
    /// Its type.
    pub type_name: String,
    /// source, processor or sink.
    pub kind: String,
    /// Readings per second taken in.
    pub in_rate: f64,
    /// Readings per second handed on (written, for a sink).
    pub out_rate: f64,
    /// Batches waiting in its input channel, and its capacity.
    pub channel: Option<(f64, f64)>,
    /// Failed writes, and calls answered other than OK.
    pub errors: f64,
    /// Readings meant for its input but dropped (`when_full = "drop"`, or
    /// after it failed).
    pub dropped: f64,
}

impl View {
    fn new(previous: Option<&Scrape>, current: &Scrape, last_reload: Option<String>) -> Self {
        let seconds = previous
            .map(|p| current.at.duration_since(p.at).as_secs_f64())
            .filter(|s| *s > 0.0);
        let rate = |name: &str, keep: &dyn Fn(&Sample) -> bool| match (previous, seconds) {
            (Some(previous), Some(seconds)) => {
                ((current.sum(name, keep) - previous.sum(name, keep)) / seconds).max(0.0)
            }
            _ => 0.0,
        };
        let mut stages = Vec::new();
        for sample in current
            .samples
            .iter()
            .filter(|s| s.name == "sink_stage_readings_sent_total")
        {
            let id = sample.label("stage").unwrap_or_default().to_string();
            let of_stage = |s: &Sample| s.label("stage") == Some(id.as_str());
            let capacity = current.stage_value("sink_stage_input_capacity_batches", &id);
            stages.push(StageRow {
                type_name: sample.label("type").unwrap_or_default().into(),
                kind: sample.label("kind").unwrap_or_default().into(),
                in_rate: rate("sink_stage_readings_received_total", &of_stage),
                out_rate: rate("sink_stage_readings_sent_total", &of_stage),
                channel: (capacity > 0.0).then(|| {
                    (
                        current.stage_value("sink_stage_input_batches", &id),
                        capacity,
                    )
                }),
                errors: current.stage_value("sink_write_errors_total", &id)
                    + current.sum("sink_grpc_calls_total", |s| {
                        of_stage(s) && s.label("code") != Some("OK")
                    }),
                dropped: current.stage_value("sink_stage_readings_dropped_total", &id),
                id,
            });
        }
        let mut calls: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for sample in current
            .samples
            .iter()
            .filter(|s| s.name == "sink_grpc_calls_total")
        {
            let code = sample.label("code").unwrap_or_default().to_string();
            let per_second = rate("sink_grpc_calls_total", &|s: &Sample| {
                s.label("code") == Some(code.as_str())
            });
            let entry = calls.entry(code).or_default();
            entry.0 += sample.value;
            entry.1 = per_second;
        }
        let reloads: Vec<(String, f64)> = current
            .samples
            .iter()
            .filter(|s| s.name == "sink_reloads_total")
            .map(|s| (s.label("outcome").unwrap_or_default().to_string(), s.value))
            .collect();
        // The outcome whose count moved since the last scrape is the last one.
        let moved = previous.and_then(|previous| {
            reloads.iter().find_map(|(outcome, count)| {
                let before = previous.sum("sink_reloads_total", |s| {
                    s.label("outcome") == Some(outcome)
                });
                (*count > before).then(|| outcome.clone())
            })
        });
        Self {
            stages,
            // Only the statuses that were ever answered.
            calls: calls
                .into_iter()
                .filter(|(_, (total, _))| *total > 0.0)
                .map(|(code, (total, rate))| (code, total, rate))
                .collect(),
            reloads,
            last_reload: moved.or(last_reload),
        }
    }

    /// The view as plain lines, for a stdout that is not a terminal.
    pub fn plain_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .stages
            .iter()
            .map(|s| {
                let channel = s
                    .channel
                    .map_or_else(|| "-".into(), |(n, cap)| format!("{n}/{cap}"));
                format!(
                    "stage={} type={} kind={} in/s={:.1} out/s={:.1} channel={channel} errors={} dropped={}",
                    s.id, s.type_name, s.kind, s.in_rate, s.out_rate, s.errors, s.dropped
                )
            })
            .collect();
        if !self.calls.is_empty() {
            lines.push(format!("grpc calls: {}", self.calls_text()));
        }
        lines.push(format!("reloads: {}", self.reloads_text()));
        lines
    }

    fn calls_text(&self) -> String {
        self.calls
            .iter()
            .map(|(code, total, rate)| format!("{code} {total} ({rate:.1}/s)"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn reloads_text(&self) -> String {
        let counts = self
            .reloads
            .iter()
            .map(|(outcome, n)| format!("{outcome} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        match &self.last_reload {
            Some(last) => format!("{counts}; last: {last}"),
            None => counts,
        }
    }
}

/// A bar of `width` cells, filled to `fraction`.
fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

/// Scrapes `address` once a `PERIOD`, keeping the previous scrape for rates.
struct Watcher {
    address: String,
    previous: Option<Scrape>,
    last_reload: Option<String>,
}

impl Watcher {
    fn refresh(&mut self) -> Result<View, String> {
        let (status, body) = fetch(&self.address, "/metrics", None)
            .map_err(|err| format!("cannot read http://{}/metrics: {err}", self.address))?;
        if status != 200 {
            return Err(format!("http://{}/metrics answered {status}", self.address));
        }
        let current = Scrape {
            samples: parse(&body),
            at: Instant::now(),
        };
        let view = View::new(self.previous.as_ref(), &current, self.last_reload.take());
        self.last_reload.clone_from(&view.last_reload);
        self.previous = Some(current);
        Ok(view)
    }
}

/// Runs `sink top` against the `[api]` endpoint at `address`.
pub fn run(address: &str) -> ExitCode {
    let mut watcher = Watcher {
        address: address.to_string(),
        previous: None,
        last_reload: None,
    };
    if io::stdout().is_terminal() {
        match live(&mut watcher) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: sink top: {err}");
                ExitCode::FAILURE
            }
        }
    } else {
        plain(&mut watcher)
    }
}

/// Plain lines each second, until the reader goes away or the process is
/// interrupted.
fn plain(watcher: &mut Watcher) -> ExitCode {
    let mut stdout = io::stdout().lock();
    loop {
        let started = Instant::now();
        let lines = match watcher.refresh() {
            Ok(view) => view.plain_lines(),
            Err(err) => vec![err],
        };
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        for line in lines {
            if writeln!(stdout, "{stamp} {line}").is_err() {
                return ExitCode::SUCCESS;
            }
        }
        if stdout.flush().is_err() {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(PERIOD.saturating_sub(started.elapsed()));
    }
}

/// The ratatui view, until `q` or Ctrl-C. The terminal is restored however
/// this ends (ratatui's panic hook covers a panic).
fn live(watcher: &mut Watcher) -> io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let outcome = (|| -> io::Result<()> {
        loop {
            let started = Instant::now();
            let view = watcher.refresh();
            terminal.draw(|frame| draw(frame, &watcher.address, &view))?;
            // Wait for a key until the next refresh is due.
            while let Some(left) = PERIOD.checked_sub(started.elapsed()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(key) = event::read()?
                    && key.kind == KeyEventKind::Press
                {
                    let ctrl_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::try_restore()?;
    outcome
}

fn draw(frame: &mut ratatui::Frame, address: &str, view: &Result<View, String>) {
    let [title, table_area, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(4),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(format!(
            "sink top: http://{address}/metrics, every second; q quits"
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    let view = match view {
        Ok(view) => view,
        Err(err) => {
            frame.render_widget(Paragraph::new(err.as_str()), table_area);
            return;
        }
    };
    let header = Row::new([
        "STAGE", "TYPE", "KIND", "IN/s", "OUT/s", "CHANNEL", "ERRORS", "DROPPED",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = view.stages.iter().map(|s| {
        let channel = match s.channel {
            Some((waiting, capacity)) => format!(
                "{} {waiting}/{capacity}",
                bar(waiting / capacity.max(1.0), 10)
            ),
            None => "-".into(),
        };
        Row::new([
            s.id.clone(),
            s.type_name.clone(),
            s.kind.clone(),
            format!("{:.1}", s.in_rate),
            format!("{:.1}", s.out_rate),
            channel,
            format!("{}", s.errors),
            format!("{}", s.dropped),
        ])
    });
    let widths = [
        Constraint::Min(12),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(12),
        Constraint::Length(24),
        Constraint::Length(8),
        Constraint::Length(8),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title("stages")),
        table_area,
    );
    let calls = if view.calls.is_empty() {
        "grpc calls: none yet".to_string()
    } else {
        format!("grpc calls: {}", view.calls_text())
    };
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(calls),
            Line::from(format!("reloads: {}", view.reloads_text())),
        ])
        .block(Block::bordered()),
        bottom,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_parses_with_escapes_and_infinities() {
        let text = "# HELP x X.\n# TYPE x counter\nx_total{stage=\"a\\\"b\",kind=\"sink\"} 3\nup 1\nh_bucket{le=\"+Inf\"} 2\nbad{x=1} 3\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(samples[0].name, "x_total");
        assert_eq!(samples[0].label("stage"), Some("a\"b"));
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[1].labels, vec![]);
        assert_eq!(samples[2].label("le"), Some("+Inf"));
    }

    #[test]
    fn rates_come_from_two_scrapes() {
        let scrape = |sent: f64, at: Instant| Scrape {
            samples: parse(&format!(
                "sink_stage_readings_received_total{{stage=\"in\",type=\"grpc\",kind=\"source\"}} {sent}\n\
                 sink_stage_readings_sent_total{{stage=\"in\",type=\"grpc\",kind=\"source\"}} {sent}\n\
                 sink_grpc_calls_total{{stage=\"in\",code=\"OK\"}} {sent}\n\
                 sink_grpc_calls_total{{stage=\"in\",code=\"UNAVAILABLE\"}} 2\n\
                 sink_stage_readings_dropped_total{{stage=\"in\"}} 4\n\
                 sink_reloads_total{{outcome=\"applied\"}} {}\n",
                sent / 10.0
            )),
            at,
        };
        let start = Instant::now();
        let first = scrape(10.0, start);
        let second = scrape(30.0, start + Duration::from_secs(2));
        let view = View::new(Some(&first), &second, None);
        assert_eq!(view.stages.len(), 1);
        assert_eq!(view.stages[0].in_rate, 10.0);
        assert_eq!(view.stages[0].out_rate, 10.0);
        assert_eq!(view.stages[0].errors, 2.0);
        assert_eq!(view.stages[0].dropped, 4.0);
        assert_eq!(view.stages[0].channel, None);
        assert_eq!(
            view.calls,
            vec![("OK".into(), 30.0, 10.0), ("UNAVAILABLE".into(), 2.0, 0.0)]
        );
        assert_eq!(view.last_reload.as_deref(), Some("applied"));
        assert!(view.plain_lines()[0].starts_with("stage=in type=grpc kind=source in/s=10.0"));
    }

    #[test]
    fn bars_fill_in_proportion() {
        assert_eq!(bar(0.5, 4), "██░░");
        assert_eq!(bar(2.0, 2), "██");
    }
}
