/* Event dispatch to the installed sink. */
#include <stdatomic.h>

#include "lamina/events.h"

static _Atomic(LamEventSink) event_sink;

void lam_event_set_sink(LamEventSink sink)
{
    atomic_store(&event_sink, sink);
}

void lam_event_emit(const char *name, json_t *data)
{
    LamEventSink sink = atomic_load(&event_sink);
    if (sink) {
        sink(name, data);
    } else {
        json_decref(data);
    }
}
