/* Shared between the files of the job layer only. */
#ifndef LAMINA_JOBS_JOB_INTERNAL_H
#define LAMINA_JOBS_JOB_INTERNAL_H

#include "jobs/job.h"

extern pthread_mutex_t job_lock; /* see job.c */

bool job_is_cancelled_locked(const LamJob *job);
void job_kick_locked(LamJob *job);
void job_transition_locked(LamJob *job, LamJobStatus to);
void job_pause_point_locked(LamJob *job);

#endif
