/* hq_model: run the exported model on a file of images.
 *
 *   hq_model IMAGES LOGITS
 *
 * IMAGES: N images of HQ_INPUT_BYTES bytes each (uint8, height x width x channels, after resize and crop).
 * LOGITS: written with N x HQ_NUM_OUTPUTS int32 output codes (native byte order).
 * Exits 1 with a message on a missing, unreadable, empty or wrongly sized file, or (built with -DHQ_DEBUG) when
 * an op's values leave their analysed bounds. Built with -DHQ_TIMING, it prints
 * the time spent in hq_run (clock ticks) to stderr: processor time, or wall time when built with -fopenmp, where
 * the images of a batch run in parallel, one scratch buffer per thread (at most HQ_MAX_THREADS; OMP_NUM_THREADS
 * sets how many). */
#if defined(HQ_TIMING) && defined(_OPENMP)
#define _POSIX_C_SOURCE 199309L /* clock_gettime: wall time across threads */
#endif
#include <stdio.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef HQ_TIMING
#include <time.h>
#endif

#include "model.h"

#ifndef HQ_MAX_THREADS
#ifdef _OPENMP
#define HQ_MAX_THREADS 16
#else
#define HQ_MAX_THREADS 1
#endif
#endif
#define HQ_BATCH 64

static int32_t scratch[HQ_MAX_THREADS][(HQ_SCRATCH_BYTES + 3) / 4];
static uint8_t images[HQ_BATCH][HQ_INPUT_BYTES];
static int32_t logits[HQ_BATCH][HQ_NUM_OUTPUTS];

#ifdef HQ_TIMING
/* wall time in microseconds with OpenMP, processor time in clock ticks otherwise (no floating point) */
#ifdef _OPENMP
#define HQ_TICKS_PER_SECOND 1000000L
static long ticks_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000000L + (long)(t.tv_nsec / 1000);
}
#else
#define HQ_TICKS_PER_SECOND ((long)CLOCKS_PER_SEC)
static long ticks_now(void) { return (long)clock(); }
#endif
#endif

int main(int argc, char **argv) {
    FILE *in, *out;
    long size, n, done;
    int threads = 1, failed = 0;
#ifdef HQ_TIMING
    long spent = 0, start;
#endif
#ifdef _OPENMP
    threads = omp_get_max_threads() < HQ_MAX_THREADS ? omp_get_max_threads() : HQ_MAX_THREADS;
#endif
    if (argc != 3) {
        fprintf(stderr, "usage: %s IMAGES LOGITS (IMAGES: uint8 %dx%dx%d images)\n", argv[0], HQ_INPUT_HEIGHT,
                HQ_INPUT_WIDTH, HQ_INPUT_CHANNELS);
        return 1;
    }
    in = fopen(argv[1], "rb");
    if (!in || fseek(in, 0, SEEK_END) != 0 || (size = ftell(in)) < 0 || fseek(in, 0, SEEK_SET) != 0) {
        fprintf(stderr, "hq_model: cannot read %s\n", argv[1]);
        return 1;
    }
    if (size == 0 || size % HQ_INPUT_BYTES != 0) {
        fprintf(stderr, "hq_model: %s holds %ld bytes, not a whole number of %d-byte images\n", argv[1], size,
                HQ_INPUT_BYTES);
        return 1;
    }
    n = size / HQ_INPUT_BYTES;
    out = fopen(argv[2], "wb");
    if (!out) {
        fprintf(stderr, "hq_model: cannot write %s\n", argv[2]);
        return 1;
    }
    for (done = 0; done < n;) {
        int batch = n - done < HQ_BATCH ? (int)(n - done) : HQ_BATCH, i;
        if (fread(images, HQ_INPUT_BYTES, (size_t)batch, in) != (size_t)batch) {
            fprintf(stderr, "hq_model: %s ends inside image %ld\n", argv[1], done);
            return 1;
        }
#ifdef HQ_TIMING
        start = ticks_now();
#endif
#ifdef _OPENMP /* an image at a time to whichever thread is free: cores of a shared machine run at unequal speeds */
#pragma omp parallel for num_threads(threads) schedule(dynamic)
#endif
        for (i = 0; i < batch; ++i) {
#ifdef _OPENMP
            if (hq_run(images[i], logits[i], scratch[omp_get_thread_num()]) != 0) failed = 1;
#else
            if (hq_run(images[i], logits[i], scratch[0]) != 0) failed = 1;
#endif
        }
        if (failed) {
            fprintf(stderr, "hq_model: a run-time check failed in images %ld to %ld\n", done, done + batch - 1);
            return 1;
        }
#ifdef HQ_TIMING
        spent += ticks_now() - start;
#endif
        if (fwrite(logits, sizeof(int32_t) * HQ_NUM_OUTPUTS, (size_t)batch, out) != (size_t)batch) {
            fprintf(stderr, "hq_model: cannot write %s\n", argv[2]);
            return 1;
        }
        done += batch;
    }
    fclose(in);
#ifdef HQ_TIMING
    fprintf(stderr, "hq_model: %ld images, %ld ticks in hq_run, %ld ticks per second, %d threads\n", n,
            spent, HQ_TICKS_PER_SECOND, threads);
#else
    (void)threads;
#endif
    if (fclose(out) != 0) {
        fprintf(stderr, "hq_model: cannot write %s\n", argv[2]);
        return 1;
    }
    return 0;
}
