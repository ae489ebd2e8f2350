//! Which log lines are written: `RUST_LOG`, or the command's default.
//!
//! A disabled `debug!` in a library the node calls on every request (h2, tonic, tokio) must
//! cost one comparison, not a walk of the filter's directives. Two things make that so. The
//! filter reports the most verbose level it can enable (`max_level_hint`), so that every
//! macro above it is skipped before reaching the subscriber. And each call site's answer is
//! cached once ("always" or "never"), which needs a filter that looks at the call site's
//! metadata only. Directives naming targets and levels (the usual `RUST_LOG`, and every
//! default here) become such a filter ([`Targets`]); only directives that depend on the span
//! an event is in or on field values (`[span{field=value}]=debug`) need [`EnvFilter`], which
//! is asked again on every call and on every entry into a span, and is used for those alone.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, Targets};
use tracing_subscriber::layer::Filter;

/// The filter of the log lines: `RUST_LOG` when it is set and valid, else `default_level`.
pub enum LineFilter {
    /// Targets and levels only: decided once per call site.
    Static(Box<Targets>),
    /// With span or field directives: decided per call.
    Dynamic(Box<EnvFilter>),
}

impl LineFilter {
    /// From the environment, as [`LineFilter::parse`] with `RUST_LOG`.
    pub fn from_env(default_level: &str) -> LineFilter {
        LineFilter::parse(std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref(), default_level)
    }

    /// `directives` if set, not blank and valid; `default_level` otherwise (an invalid
    /// `RUST_LOG` falls back to the default, as it always has).
    pub fn parse(directives: Option<&str>, default_level: &str) -> LineFilter {
        let directives = directives.map(str::trim).filter(|directives| !directives.is_empty());
        if let Some(directives) = directives {
            if let Ok(targets) = directives.parse::<Targets>() {
                return LineFilter::Static(Box::new(targets));
            }
            if let Ok(filter) = EnvFilter::try_new(directives) {
                return LineFilter::Dynamic(Box::new(filter));
            }
        }
        match default_level.parse::<Targets>() {
            Ok(targets) => LineFilter::Static(Box::new(targets)),
            Err(_) => LineFilter::Dynamic(Box::new(EnvFilter::new(default_level))),
        }
    }

    /// The most verbose level this filter lets through.
    pub fn max_level(&self) -> Option<LevelFilter> {
        match self {
            LineFilter::Static(targets) => {
                <Targets as Filter<tracing_subscriber::Registry>>::max_level_hint(&**targets)
            }
            LineFilter::Dynamic(filter) => filter.max_level_hint(),
        }
    }

    /// This filter narrowed by `also` (a function of the call site alone), boxed for the
    /// lines layer. `also` carries the filter's own level hint, so the pair keeps one.
    pub fn and_also<S>(self, also: fn(&tracing::Metadata<'_>) -> bool) -> Box<dyn Filter<S> + Send + Sync + 'static>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let hint = self.max_level().unwrap_or(LevelFilter::TRACE);
        // A `filter_fn` without a hint would make the pair's hint "anything" (the lesser of
        // the two hints, and no hint is the least), and every disabled macro would call in.
        let also = tracing_subscriber::filter::filter_fn(also).with_max_level_hint(hint);
        match self {
            LineFilter::Static(targets) => Box::new((*targets).and(also)),
            LineFilter::Dynamic(filter) => Box::new((*filter).and(also)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_levels_make_a_static_filter_with_a_level_hint() {
        let filter = LineFilter::parse(None, "info,openraft=warn,ractor_cluster=warn");
        assert!(matches!(filter, LineFilter::Static(_)));
        assert_eq!(filter.max_level(), Some(LevelFilter::INFO));
        let filter = LineFilter::parse(Some("warn,flotilla=debug"), "info");
        assert!(matches!(filter, LineFilter::Static(_)));
        assert_eq!(filter.max_level(), Some(LevelFilter::DEBUG));
    }

    #[test]
    fn span_and_field_directives_keep_the_dynamic_filter() {
        let filter = LineFilter::parse(Some("warn,[agent{team=blue}]=debug"), "info");
        assert!(matches!(filter, LineFilter::Dynamic(_)));
        // A span directive may enable anything inside its span: the hint is as wide as that.
        assert!(filter.max_level().is_some());
    }

    #[test]
    fn an_unset_blank_or_invalid_rust_log_falls_back_to_the_default() {
        for directives in [None, Some(""), Some("  "), Some("flotilla=loud")] {
            let filter = LineFilter::parse(directives, "warn");
            assert!(matches!(filter, LineFilter::Static(_)), "{directives:?}");
            assert_eq!(filter.max_level(), Some(LevelFilter::WARN), "{directives:?}");
        }
    }

    #[test]
    fn the_narrowed_filter_keeps_the_level_hint() {
        let filter = LineFilter::parse(None, "info").and_also::<tracing_subscriber::Registry>(|_| true);
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::INFO));
    }

    /// Records the metadata of every call site registered, to ask another subscriber about.
    #[derive(Default, Clone)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<&'static tracing::Metadata<'static>>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn register_callsite(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
            self.0.lock().unwrap().push(metadata);
            tracing::subscriber::Interest::always()
        }
    }

    #[test]
    fn the_lines_decide_once_per_call_site_and_skip_what_they_leave_out() {
        use tracing::Subscriber as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::Layer as _;
        let capture = Capture::default();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(capture.clone()), || {
            tracing::debug!(target: "h2::codec", "a frame");
            tracing::info!(target: "flotilla::server", "a line");
            let _ = tracing::info_span!(target: crate::observability::traces::TRACE_TARGET, "rpc");
        });
        let sites = capture.0.lock().unwrap().clone();
        assert_eq!(sites.len(), 3);
        // As the node builds its subscriber without an OTLP endpoint.
        let lines = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(LineFilter::parse(None, "info").and_also(crate::observability::traces::logged));
        let subscriber = tracing_subscriber::registry().with(lines);
        assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::INFO));
        let interests: Vec<_> = sites.iter().map(|site| subscriber.register_callsite(site)).collect();
        assert!(interests[0].is_never(), "a disabled debug event: {:?}", interests[0]);
        assert!(interests[1].is_always(), "an info line: {:?}", interests[1]);
        assert!(interests[2].is_never(), "a span for traces only: {:?}", interests[2]);
    }
}
