/* hq_model: run the exported model on a file of images.
 *
 *   hq_model IMAGES LOGITS
 *
 * IMAGES: N images of HQ_INPUT_BYTES bytes each (uint8, height x width x channels, after resize and crop).
 * LOGITS: written with N x HQ_NUM_OUTPUTS int32 output codes (native byte order).
 * Exits 1 with a message on a missing, unreadable, empty or wrongly sized file. Built with -DHQ_TIMING, it prints
 * the processor time spent in hq_run (clock ticks) to stderr. */
#include <stdio.h>
#ifdef HQ_TIMING
#include <time.h>
#endif

#include "model.h"

static int32_t scratch[(HQ_SCRATCH_BYTES + 3) / 4];
static uint8_t image[HQ_INPUT_BYTES];
static int32_t logits[HQ_NUM_OUTPUTS];

int main(int argc, char **argv) {
    FILE *in, *out;
    long size, n, i;
#ifdef HQ_TIMING
    clock_t ticks = 0, start;
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
    for (i = 0; i < n; ++i) {
        if (fread(image, 1, HQ_INPUT_BYTES, in) != HQ_INPUT_BYTES) {
            fprintf(stderr, "hq_model: %s ends inside image %ld\n", argv[1], i);
            return 1;
        }
#ifdef HQ_TIMING
        start = clock();
        hq_run(image, logits, scratch);
        ticks += clock() - start;
#else
        hq_run(image, logits, scratch);
#endif
        if (fwrite(logits, sizeof(int32_t), HQ_NUM_OUTPUTS, out) != HQ_NUM_OUTPUTS) {
            fprintf(stderr, "hq_model: cannot write %s\n", argv[2]);
            return 1;
        }
    }
    fclose(in);
#ifdef HQ_TIMING
    fprintf(stderr, "hq_model: %ld images, %ld ticks in hq_run, %ld ticks per second\n", n, (long)ticks,
            (long)CLOCKS_PER_SEC);
#endif
    if (fclose(out) != 0) {
        fprintf(stderr, "hq_model: cannot write %s\n", argv[2]);
        return 1;
    }
    return 0;
}
