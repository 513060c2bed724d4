/*
 * mapping.h — the words of the Cirron → OpenTelemetry mapping (README, "OpenTelemetry"):
 * the OTLP protobuf field numbers otlp.c writes, and the attribute keys it adds. Header-only,
 * no Python.
 *
 * Field numbers are those of opentelemetry-proto (v1): collector/trace/v1/trace_service.proto,
 * trace/v1/trace.proto, common/v1/common.proto, resource/v1/resource.proto, and the metrics
 * ones named where they are. Only the fields
 * the encoder writes are named.
 *
 * The attribute keys are defined here once: module.c exports each as a module constant of
 * the same name (cirron_otel._native.KEY_SPAN_ID, ...), which the Python side reads
 * (exporters/otel_spool.py maps spans back to the spool with them).
 */
#ifndef CIRRON_OTEL_MAPPING_H
#define CIRRON_OTEL_MAPPING_H

/* -- OTLP messages (field numbers) ----------------------------------------------------- */

enum { EXPORT_REQUEST_RESOURCE_SPANS = 1 }; /* ExportTraceServiceRequest */

enum { RESOURCE_SPANS_RESOURCE = 1, RESOURCE_SPANS_SCOPE_SPANS = 2 }; /* ResourceSpans */

enum { SCOPE_SPANS_SCOPE = 1, SCOPE_SPANS_SPANS = 2 }; /* ScopeSpans */

enum { SCOPE_NAME = 1, SCOPE_VERSION = 2 }; /* InstrumentationScope */

enum { /* Span */
    SPAN_TRACE_ID = 1,
    SPAN_SPAN_ID = 2,
    SPAN_PARENT_SPAN_ID = 4,
    SPAN_NAME = 5,
    SPAN_KIND = 6,
    SPAN_START_TIME_UNIX_NANO = 7,
    SPAN_END_TIME_UNIX_NANO = 8,
    SPAN_ATTRIBUTES = 9,
    SPAN_DROPPED_ATTRIBUTES_COUNT = 10,
    SPAN_EVENTS = 11,
    SPAN_DROPPED_EVENTS_COUNT = 12,
    SPAN_LINKS = 13,
    SPAN_DROPPED_LINKS_COUNT = 14,
    SPAN_STATUS = 15,
    SPAN_FLAGS = 16,
};

enum { /* Span.Event */
    EVENT_TIME_UNIX_NANO = 1,
    EVENT_NAME = 2,
    EVENT_ATTRIBUTES = 3,
    EVENT_DROPPED_ATTRIBUTES_COUNT = 4,
};

enum { /* Span.Link */
    LINK_TRACE_ID = 1,
    LINK_SPAN_ID = 2,
    LINK_ATTRIBUTES = 4,
    LINK_DROPPED_ATTRIBUTES_COUNT = 5,
};

enum { STATUS_MESSAGE = 2, STATUS_CODE = 3 }; /* Status */

enum { KEY_VALUE_KEY = 1, KEY_VALUE_VALUE = 2 }; /* KeyValue */

enum { /* AnyValue */
    ANY_VALUE_STRING = 1,
    ANY_VALUE_BOOL = 2,
    ANY_VALUE_INT = 3,
    ANY_VALUE_DOUBLE = 4,
    ANY_VALUE_ARRAY = 5,
};

enum { ARRAY_VALUE_VALUES = 1 }; /* ArrayValue */

/* metrics: collector/metrics/v1/metrics_service.proto, metrics/v1/metrics.proto */
enum { EXPORT_METRICS_REQUEST_RESOURCE_METRICS = 1 }; /* ExportMetricsServiceRequest */

enum { RESOURCE_METRICS_RESOURCE = 1, RESOURCE_METRICS_SCOPE_METRICS = 2 }; /* ResourceMetrics */

enum { SCOPE_METRICS_SCOPE = 1, SCOPE_METRICS_METRICS = 2 }; /* ScopeMetrics */

enum { METRIC_NAME = 1, METRIC_UNIT = 3, METRIC_SUM = 7 }; /* Metric */

enum { SUM_DATA_POINTS = 1, SUM_AGGREGATION_TEMPORALITY = 2, SUM_IS_MONOTONIC = 3 }; /* Sum */

enum { /* NumberDataPoint */
    NUMBER_DATA_POINT_START_TIME_UNIX_NANO = 2,
    NUMBER_DATA_POINT_TIME_UNIX_NANO = 3,
    NUMBER_DATA_POINT_AS_DOUBLE = 4,
    NUMBER_DATA_POINT_EXEMPLARS = 5,
    NUMBER_DATA_POINT_AS_INT = 6, /* sfixed64 */
    NUMBER_DATA_POINT_ATTRIBUTES = 7,
};

enum { /* Exemplar */
    EXEMPLAR_TIME_UNIX_NANO = 2,
    EXEMPLAR_AS_DOUBLE = 3,
    EXEMPLAR_SPAN_ID = 4,
    EXEMPLAR_TRACE_ID = 5,
    EXEMPLAR_AS_INT = 6, /* sfixed64 */
};

/* -- OTLP enum and flag values --------------------------------------------------------- */

enum { SPAN_KIND_INTERNAL = 1 };  /* Span.SpanKind */
enum { AGGREGATION_TEMPORALITY_CUMULATIVE = 2 }; /* AggregationTemporality */
enum { STATUS_CODE_ERROR = 2 };   /* Status.StatusCode */
/* Span.flags (fixed32): W3C trace flags 0x01 (sampled) | SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
 * (0x100) with SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK (0x200) clear: sampled, known not remote */
#define SPAN_FLAGS_SAMPLED_LOCAL 0x101u

/* -- attribute keys and names the mapping writes ----------------------------------------- */

/* on spans */
#define KEY_INDEX "cirron.index"           /* scope(name, index) */
#define KEY_SPAN_ID "cirron.span_id"       /* the 32-hex spool id */
#define KEY_RANK "cirron.rank"
#define KEY_CPU_NS "cirron.cpu_ns"
#define KEY_GPU_NS "cirron.gpu_ns"         /* read back by the spool exporter; not written */
#define KEY_SESSION_ID "cirron.session.id" /* a session child that starts its own trace */
#define KEY_SUMMARY_PREFIX "cirron.summary." /* + the name of a summary mark */
#define KEY_THREAD_ID "thread.id"
#define KEY_THREAD_NAME "thread.name"
#define KEY_CODE_FUNCTION "code.function.name"
#define KEY_CODE_FILE "code.file.path"
#define KEY_CODE_LINE "code.line.number"
/* on the events of point marks */
#define KEY_MARK_VALUE "cirron.mark.value"
#define KEY_MARK_KIND "cirron.mark.kind"
#define KEY_MARK_ID "cirron.mark.id"
/* on the link from a trace to the session */
#define KEY_LINK "cirron.link"
#define KEY_SCOPE "cirron.scope" /* a metric point: the name of the scope its mark attached to */
#define SESSION_SCOPE "cirron.session" /* that name for the marks on the session */
/* the event of a span closed by an exception (OpenTelemetry semantic conventions) */
#define EVENT_EXCEPTION "exception"
#define KEY_EXCEPTION_TYPE "exception.type"
#define KEY_EXCEPTION_MESSAGE "exception.message"
#define KEY_EXCEPTION_STACKTRACE "exception.stacktrace"

/* the event of a weight / gradient snapshot on its epoch span (cirron_otel._snapshots): its
 * attributes are this prefix + the spool record's field (tensor_name, mean, histogram.bins…) */
#define EVENT_SNAPSHOT "cirron.snapshot"
#define KEY_SNAPSHOT_PREFIX "cirron.snapshot."

/* X(name) for each key exported to Python as a module constant `name` */
#define MAPPING_KEYS(X)                                                                        \
    X(KEY_INDEX)                                                                               \
    X(KEY_SPAN_ID)                                                                             \
    X(KEY_RANK)                                                                                \
    X(KEY_CPU_NS)                                                                              \
    X(KEY_GPU_NS)                                                                              \
    X(KEY_SESSION_ID)                                                                          \
    X(KEY_SUMMARY_PREFIX)                                                                      \
    X(KEY_THREAD_ID)                                                                           \
    X(KEY_THREAD_NAME)                                                                         \
    X(KEY_CODE_FUNCTION)                                                                       \
    X(KEY_CODE_FILE)                                                                           \
    X(KEY_CODE_LINE)                                                                           \
    X(KEY_MARK_VALUE)                                                                          \
    X(KEY_MARK_KIND)                                                                           \
    X(KEY_MARK_ID)                                                                             \
    X(KEY_LINK)                                                                                \
    X(KEY_SCOPE)                                                                               \
    X(EVENT_EXCEPTION)                                                                         \
    X(KEY_EXCEPTION_TYPE)                                                                      \
    X(KEY_EXCEPTION_MESSAGE)                                                                   \
    X(KEY_EXCEPTION_STACKTRACE)                                                                \
    X(EVENT_SNAPSHOT)                                                                          \
    X(KEY_SNAPSHOT_PREFIX)

#endif /* CIRRON_OTEL_MAPPING_H */
