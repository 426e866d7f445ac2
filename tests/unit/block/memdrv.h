#ifndef TEST_MEMDRV_H
#define TEST_MEMDRV_H

#include "lamina/driver.h"

typedef struct MemState {
    uint8_t *data;
    int64_t size;
    uint32_t align;
    /* lock protects data, the counters below it and the hold gate */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool hold_reads, hold_writes;
    int entered;
    int nreads, nwrites, nfua;
    _Atomic int nflush;
    _Atomic int misaligned;
} MemState;

extern const LamDriver test_drv_mem;
void mem_set_hold(LamNode *bs, bool reads, bool writes);
void mem_wait_entered(LamNode *bs, int n);

#endif
