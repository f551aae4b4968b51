//! Which exposition format a scrape gets, chosen from its `Accept` header as
//! Prometheus' own client libraries choose (client_golang's
//! `expfmt.NegotiateIncludingOpenMetrics`): OpenMetrics 1.0.0 when the
//! most preferred media type the page can be is
//! `application/openmetrics-text`, the Prometheus text format 0.0.4
//! otherwise (no header, `*/*`, `text/plain`, anything else).
//!
//! The two differ where a text-format parser (promtool, older scrapers)
//! would reject OpenMetrics: info families are gauges named `..._info`,
//! units and exemplars are left out, and there is no `# EOF`.

use prometheus_client::registry::Registry;

/// An exposition format of the metrics page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Text,
    /// OpenMetrics text, version 1.0.0.
    OpenMetrics,
}

impl Format {
    /// Every format, in the order of [`Format::index`].
    pub const ALL: [Format; 2] = [Format::Text, Format::OpenMetrics];

    /// Its place in [`Format::ALL`].
    pub fn index(self) -> usize {
        match self {
            Format::Text => 0,
            Format::OpenMetrics => 1,
        }
    }

    /// The `Content-Type` of a page in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// `registry` encoded in this format.
    pub fn encode(self, registry: &Registry) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        match self {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut body, registry)?
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut body, registry)?,
        }
        Ok(body)
    }

    /// The format `accept` (an `Accept` header's value, if any) asks for.
    pub fn negotiate(accept: Option<&[u8]>) -> Format {
        let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
            return Format::Text;
        };
        let mut ranges: Vec<(f32, Option<Format>)> = accept
            .split(',')
            .filter_map(media_range)
            .filter(|(q, _)| *q > 0.0)
            .collect();
        // Most preferred first; equal preferences in the header's order.
        ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranges
            .into_iter()
            .find_map(|(_, format)| format)
            .unwrap_or(Format::Text)
    }
}

/// One media range of an `Accept` header: its quality and the format it
/// names, if it names one the page can be (a version the page cannot be
/// names none).
fn media_range(range: &str) -> Option<(f32, Option<Format>)> {
    let mut parts = range.split(';');
    let media = parts.next()?.trim().to_ascii_lowercase();
    if media.is_empty() {
        return None;
    }
    let mut q = 1.0f32;
    let mut version = String::new();
    for param in parts {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match key.trim().to_ascii_lowercase().as_str() {
            // An unreadable quality makes the range unusable.
            "q" => q = value.parse().ok().filter(|q: &f32| q.is_finite())?,
            "version" => version = value.to_string(),
            _ => {}
        }
    }
    let format = match (media.as_str(), version.as_str()) {
        ("application/openmetrics-text", "" | "1.0.0" | "0.0.1") => Some(Format::OpenMetrics),
        ("text/plain", "" | "0.0.4") => Some(Format::Text),
        _ => None,
    };
    Some((q, format))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(accept: &str) -> Format {
        Format::negotiate(Some(accept.as_bytes()))
    }

    #[test]
    fn prometheus_scrapers_get_openmetrics() {
        // Prometheus 2.x's scrape Accept header.
        assert_eq!(
            of(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            ),
            Format::OpenMetrics
        );
        assert_eq!(of("application/openmetrics-text"), Format::OpenMetrics);
        assert_eq!(
            of("Application/OpenMetrics-Text; Version=\"1.0.0\""),
            Format::OpenMetrics
        );
    }

    #[test]
    fn everything_else_gets_the_text_format() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some(b"\xff\xfe")), Format::Text);
        for accept in [
            "",
            "*/*",
            "text/plain;version=0.0.4",
            "text/plain; version=0.0.4; charset=utf-8",
            "text/html, */*;q=0.8",
            "application/json",
            ",,;;=",
            // A version the page cannot be is passed over.
            "application/openmetrics-text; version=2.0.0",
        ] {
            assert_eq!(of(accept), Format::Text, "{accept:?}");
        }
    }

    #[test]
    fn preferences_decide() {
        assert_eq!(
            of("text/plain;version=0.0.4;q=0.5, application/openmetrics-text;version=1.0.0"),
            Format::OpenMetrics
        );
        assert_eq!(
            of("application/openmetrics-text;q=0.4, text/plain;version=0.0.4;q=0.9"),
            Format::Text
        );
        // Equal preference: the header's order.
        assert_eq!(of("text/plain, application/openmetrics-text"), Format::Text);
        // q=0 is "not acceptable"; an unreadable q is left out.
        assert_eq!(of("application/openmetrics-text;q=0"), Format::Text);
        assert_eq!(of("application/openmetrics-text;q=x"), Format::Text);
        assert_eq!(
            of("application/openmetrics-text;q=NaN, application/openmetrics-text;q=0.1"),
            Format::OpenMetrics
        );
    }
}
