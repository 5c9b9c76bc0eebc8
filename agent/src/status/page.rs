//! The jobs page: one HTML document with no external assets (an offline
//! host renders it), refreshing itself every two seconds. One row per job
//! (disk, peer, phase, progress bar, rate, ETA, bytes, start and end,
//! result or error code and hint), one per protected disk (last point,
//! consistency, RPO against its target).

use serde_json::Value;

use crate::jobs::Job;
use crate::units::{format_time, human_bytes};

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn job_row(j: &Job) -> String {
    let now = crate::ids::now_unix_ns();
    let end = j.ended_unix_ns.unwrap_or(now);
    let secs = ((end - j.started_unix_ns).max(1) as f64) / 1e9;
    let rate = j.bytes_done as f64 / secs;
    let eta = match (j.ended_unix_ns, j.bytes_total > j.bytes_done && rate > 0.0) {
        (None, true) => format!("{:.0} s", (j.bytes_total - j.bytes_done) as f64 / rate),
        _ => String::new(),
    };
    let bar = match j.bytes_total {
        0 => String::new(),
        t => format!("<progress value=\"{}\" max=\"{t}\"></progress>", j.bytes_done.min(t)),
    };
    let result = match &j.result {
        None => "<span class=run>running</span>".to_string(),
        Some(r) if r.ok => format!(
            "<span class=ok>ok</span> {} {}",
            esc(r.generation.as_deref().unwrap_or("")),
            esc(r.consistency.as_deref().unwrap_or(""))
        ),
        Some(r) => format!(
            "<span class=err>error[{}]</span> {} <div class=hint>{}</div>",
            esc(r.code.as_deref().unwrap_or("")),
            esc(r.message.as_deref().unwrap_or("")),
            esc(r.hint.as_deref().unwrap_or(""))
        ),
    };
    format!(
        "<tr id=\"job-{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{bar} {}</td><td>{}/s</td><td>{eta}</td><td>{}</td><td>{}</td><td>{result}</td></tr>\n",
        j.id,
        j.id,
        esc(&j.kind),
        esc(&j.disk),
        esc(&j.peer),
        esc(&j.target),
        esc(&j.phase),
        human_bytes(j.bytes_done),
        human_bytes(rate as u64),
        format_time(j.started_unix_ns),
        j.ended_unix_ns.map(format_time).unwrap_or_default(),
    )
}

fn protect_row(p: &Value) -> String {
    let s = |k: &str| esc(p[k].as_str().unwrap_or(""));
    let over = p["over_rpo"] == Value::Bool(true);
    let rpo = format!(
        "{:.0} s of {:.0} s {}",
        p["rpo_seconds"].as_f64().unwrap_or(0.0),
        p["rpo_target_seconds"].as_f64().unwrap_or(0.0),
        if over { "<span class=err>OVER</span>" } else { "<span class=ok>ok</span>" }
    );
    format!(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{rpo}</td><td>{}</td></tr>\n",
        s("disk"),
        s("peer"),
        s("target"),
        s("last_point"),
        p["last_point_unix_ns"].as_i64().map(format_time).unwrap_or_default(),
        s("last_consistency"),
        s("last_error"),
    )
}

pub fn render(jobs: &[Job], protected: &[Value], last_reload: Option<&Value>) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2>\
         <title>diskferry jobs</title><style>\
         body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;width:100%;margin-bottom:2em}\
         td,th{border-bottom:1px solid #ddd;padding:4px;text-align:left;font-size:13px}\
         .ok{color:#080}.err{color:#b00;font-weight:bold}.run{color:#06c}.hint{color:#555;font-size:12px}\
         progress{width:8em}</style></head><body><h1>diskferry</h1>",
    );
    if let Some(r) = last_reload.filter(|r| r["ok"] == false) {
        html.push_str(&format!(
            "<p class=err id=reload>The last config reload was refused; the old config keeps running: {}</p>\n",
            esc(r["error"].as_str().unwrap_or("-"))
        ));
    }
    html.push_str("<h2>Protected disks</h2><table><tr><th>disk</th><th>peer</th><th>target</th><th>last point</th><th>taken</th><th>consistency</th><th>RPO</th><th>last error</th></tr>\n");
    for p in protected {
        html.push_str(&protect_row(p));
    }
    html.push_str("</table><h2>Jobs</h2><table><tr><th>id</th><th>kind</th><th>disk</th><th>peer</th><th>target</th><th>phase</th><th>progress</th><th>rate</th><th>ETA</th><th>started</th><th>ended</th><th>result</th></tr>\n");
    for j in jobs {
        html.push_str(&job_row(j));
    }
    html.push_str("</table></body></html>\n");
    html
}
