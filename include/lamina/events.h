/* Event sink.  Anything (jobs, exports, qcow2 corruption) raises QMP
 * events through lam_event_emit(); the daemon installs a sink that stamps
 * and broadcasts them to every negotiated QMP client.  Without a sink
 * (lamina-img) events are dropped.  Thread safe: may be called from any
 * thread; the sink must be thread safe too. */
#ifndef LAMINA_EVENTS_H
#define LAMINA_EVENTS_H

#include <jansson.h>

typedef void (*LamEventSink)(const char *name, json_t *data /* stolen */);
void lam_event_set_sink(LamEventSink sink);
/* data is stolen (may be NULL for an event without data). */
void lam_event_emit(const char *name, json_t *data);

#endif
