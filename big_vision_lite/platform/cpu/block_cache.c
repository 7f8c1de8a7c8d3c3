// A cache of large aligned host blocks, preloaded (LD_PRELOAD) into XLA:CPU training processes.
//
// XLA:CPU asks posix_memalign for its step temporaries (one block of 1.2 GB for ViT-Ti/16 at
// batch 32) and frees them at the end of every step. glibc 2.36 reuses a freed block of exactly
// that size only sometimes (memalign asks its bins for the size plus the alignment), so a kept
// heap grows to 3-4 such blocks, each first touch costing a page fault per 4 KB
// (benchmarks/RESULTS.md, rounds 7-11). This library serves aligned requests of at least
// BVL_BLOCK_CACHE_MIN_BYTES (default 1 MiB) from their own mappings, keeps a freed mapping and
// hands it to the next request it fits (at most twice the size asked for), so that a step
// reuses the previous step's pages. Everything else goes to glibc.
//
// Memory bound: a freed mapping is kept while the live and kept blocks together stay within
// twice the peak of live ones; past that it is unmapped. Without the wait below, the runs
// measured held two blocks of temporaries: the trainer dispatches a step before the previous
// one has freed its temporaries.
//
// A short wait: a request of BVL_BLOCK_CACHE_WAIT_MIN_BYTES (64 MiB) or more that no kept block
// fits, while a live block would fit it, waits up to BVL_BLOCK_CACHE_WAIT_MS (20 ms; 0: never)
// for that block to be freed. A loop that waits for each step's outputs then starts the next
// step gets there a moment before XLA frees the previous step's temporaries, and would map a
// second block for good. A size whose wait ran out is not waited for again: where two such
// blocks are genuinely live at once (the trainer's dispatch ahead), that costs one wait.
//
// Only glibc's entry points are wrapped (__libc_*), so it must not be combined with another
// preloaded allocator; big_vision_lite/block_cache.py does not preload it where LD_PRELOAD is set.
// Known limit: glibc functions that grow a caller's buffer with glibc's own realloc (getline,
// getdelim) must not be given a block from the aligned functions of 1 MiB or more.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

// pthread_cond_clockwait (glibc 2.30) waits on the monotonic clock, which no clock change moves.
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
#define HAVE_CLOCKWAIT 1
#else
#define HAVE_CLOCKWAIT 0
#endif

extern void* __libc_memalign(size_t alignment, size_t size);
extern void __libc_free(void* p);
extern void* __libc_realloc(void* p, size_t size);

#define PAGE ((size_t)4096)
#define LIVE_SLOTS ((size_t)1 << 16)  // a power of two, well above the live blocks of a run
#define FREE_SLOTS 4096
#define GAVE_UP_SLOTS 64

typedef struct {
  uintptr_t addr;  // 0: empty slot
  size_t size;
} block;

// Live blocks: open addressing with linear probing, deleted by backward shift (no tombstones).
static block live[LIVE_SLOTS];
static size_t n_live;
static block freed[FREE_SLOTS];
static int n_freed;
static size_t min_bytes = (size_t)1 << 20;
static size_t live_bytes, freed_bytes, peak_live_bytes;
static uint64_t n_mapped, n_reused, n_unmapped;
static size_t wait_min_bytes = (size_t)64 << 20;
static long wait_ms = HAVE_CLOCKWAIT ? 20 : 0;
static uint64_t n_waits, n_waits_served;
static int n_waiting;
static size_t gave_up[GAVE_UP_SLOTS];  // sizes whose wait ran out: not waited for again
static int n_gave_up;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t freed_cv = PTHREAD_COND_INITIALIZER;
static size_t (*next_usable_size)(void*);

static size_t home(uintptr_t addr) {
  return (size_t)(((addr >> 12) * 0x9E3779B97F4A7C15ull) >> 48) & (LIVE_SLOTS - 1);
}

static size_t find(uintptr_t addr) {  // slot of addr, or LIVE_SLOTS
  for (size_t i = home(addr);; i = (i + 1) & (LIVE_SLOTS - 1)) {
    if (live[i].addr == addr) return i;
    if (live[i].addr == 0) return LIVE_SLOTS;
  }
}

static int insert(uintptr_t addr, size_t size) {
  if (n_live + 1 >= LIVE_SLOTS / 2) return 0;  // keeps probes short; the caller falls back
  size_t i = home(addr);
  while (live[i].addr) i = (i + 1) & (LIVE_SLOTS - 1);
  live[i].addr = addr;
  live[i].size = size;
  n_live++;
  return 1;
}

static void erase(size_t i) {
  live[i].addr = 0;
  n_live--;
  // Moves later entries of the probe run back, so that lookups still stop at the first hole.
  for (size_t j = (i + 1) & (LIVE_SLOTS - 1); live[j].addr; j = (j + 1) & (LIVE_SLOTS - 1)) {
    size_t h = home(live[j].addr);
    int movable = (i <= j) ? (h <= i || h > j) : (h <= i && h > j);
    if (movable) {
      live[i] = live[j];
      live[j].addr = 0;
      i = j;
    }
  }
}

// Unmaps every kept block; returns how many there were.
static int drop_kept(void) {
  pthread_mutex_lock(&mu);  // held across the munmaps: a rare path, and no copy on the stack
  int n = n_freed;
  for (int i = 0; i < n; i++) munmap((void*)freed[i].addr, freed[i].size);
  n_freed = 0;
  freed_bytes = 0;
  n_unmapped += (uint64_t)n;
  pthread_mutex_unlock(&mu);
  return n;
}

static int fits(size_t block_size, size_t n) { return block_size >= n && block_size / 2 <= n; }

static int best_kept(size_t n) {  // the smallest kept block that fits n, or -1
  int best = -1;
  for (int i = 0; i < n_freed; i++)
    if (fits(freed[i].size, n) && (best < 0 || freed[i].size < freed[best].size)) best = i;
  return best;
}

// With mu held: whether a request of n bytes that no kept block fits should wait for a free.
static int should_wait(size_t n) {
  if (wait_ms <= 0 || n < wait_min_bytes) return 0;
  for (int i = 0; i < n_gave_up; i++)
    if (gave_up[i] == n) return 0;
  for (size_t i = 0; i < LIVE_SLOTS; i++)  // a scan, but only for rare large requests
    if (live[i].addr && fits(live[i].size, n)) return 1;
  return 0;
}

// With mu held: waits up to wait_ms for a kept block that fits n; its index, or -1.
static int wait_for_kept(size_t n) {
#if HAVE_CLOCKWAIT
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += wait_ms / 1000;
  deadline.tv_nsec += (wait_ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  n_waits++;
  n_waiting++;
  int best = -1;
  while ((best = best_kept(n)) < 0) {
    if (pthread_cond_clockwait(&freed_cv, &mu, CLOCK_MONOTONIC, &deadline) == ETIMEDOUT) {
      best = best_kept(n);
      break;
    }
  }
  n_waiting--;
  if (best >= 0) {
    n_waits_served++;
  } else if (n_gave_up < GAVE_UP_SLOTS) {
    gave_up[n_gave_up++] = n;
  }
  return best;
#else
  (void)n;
  return -1;
#endif
}

static void* map_block(size_t size) {
  size_t n = (size + PAGE - 1) & ~(PAGE - 1);
  void* p = NULL;
  pthread_mutex_lock(&mu);
  int best = best_kept(n);
  if (best < 0 && should_wait(n)) best = wait_for_kept(n);
  if (best >= 0) {
    p = (void*)freed[best].addr;
    n = freed[best].size;
    freed[best] = freed[--n_freed];
    freed_bytes -= n;
    n_reused++;
  }
  // Counted live before mmap returns: a free racing with this call then sees the peak this
  // call makes and keeps its block for the next such overlap.
  live_bytes += n;
  if (live_bytes > peak_live_bytes) peak_live_bytes = live_bytes;
  if (p && !insert((uintptr_t)p, n)) {  // table full: give the block back
    live_bytes -= n;
    pthread_mutex_unlock(&mu);
    munmap(p, n);
    return NULL;
  }
  pthread_mutex_unlock(&mu);
  if (p) return p;
  p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED && drop_kept()) {  // out of address space or memory: kept blocks first
    p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  pthread_mutex_lock(&mu);
  if (p == MAP_FAILED || !insert((uintptr_t)p, n)) {
    live_bytes -= n;
    pthread_mutex_unlock(&mu);
    if (p != MAP_FAILED) munmap(p, n);
    return NULL;
  }
  n_mapped++;
  pthread_mutex_unlock(&mu);
  return p;
}

// Takes back p if it is one of ours (returns 1), else returns 0.
static int release_block(void* p) {
  // Ours are page-aligned; glibc's pointers rarely are, and then the table says no.
  if (!p || ((uintptr_t)p & (PAGE - 1))) return 0;
  pthread_mutex_lock(&mu);
  size_t i = find((uintptr_t)p);
  if (i == LIVE_SLOTS) {
    pthread_mutex_unlock(&mu);
    return 0;
  }
  size_t n = live[i].size;
  erase(i);
  live_bytes -= n;
  // Not "kept <= peak": a run with two blocks of temporaries in flight and one small kept block
  // would then unmap one of the two whenever both were freed, and map it again on the next step.
  int keep = n_freed < FREE_SLOTS && live_bytes + freed_bytes + n <= 2 * peak_live_bytes;
  if (keep) {
    freed[n_freed].addr = (uintptr_t)p;
    freed[n_freed].size = n;
    n_freed++;
    freed_bytes += n;
    if (n_waiting) pthread_cond_broadcast(&freed_cv);
  } else {
    n_unmapped++;
  }
  pthread_mutex_unlock(&mu);
  if (!keep) munmap(p, n);
  return 1;
}

static size_t block_size(void* p) {  // 0 if not ours
  if (!p || ((uintptr_t)p & (PAGE - 1))) return 0;
  pthread_mutex_lock(&mu);
  size_t i = find((uintptr_t)p);
  size_t n = i == LIVE_SLOTS ? 0 : live[i].size;
  pthread_mutex_unlock(&mu);
  return n;
}

static void* aligned(size_t alignment, size_t size) {
  // Anything unusual (an alignment that is not a power of two, or above a page) is glibc's.
  if (size >= min_bytes && alignment <= PAGE && (alignment & (alignment - 1)) == 0) {
    void* p = map_block(size);
    if (p) return p;
  }
  return __libc_memalign(alignment, size);
}

int posix_memalign(void** out, size_t alignment, size_t size) {
  if (alignment < sizeof(void*) || (alignment & (alignment - 1))) return EINVAL;
  void* p = aligned(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void* aligned_alloc(size_t alignment, size_t size) { return aligned(alignment, size); }

void* memalign(size_t alignment, size_t size) { return aligned(alignment, size); }

void free(void* p) {
  if (!release_block(p)) __libc_free(p);
}

void* realloc(void* p, size_t size) {
  size_t n = block_size(p);
  if (!n) return __libc_realloc(p, size);
  if (size == 0) {
    release_block(p);
    return NULL;
  }
  void* q = aligned(16, size);
  if (!q) {
    errno = ENOMEM;
    return NULL;
  }
  memcpy(q, p, size < n ? size : n);
  release_block(p);
  return q;
}

void* reallocarray(void* p, size_t count, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(count, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, total);
}

size_t malloc_usable_size(void* p) {
  size_t n = block_size(p);
  if (n) return n;
  if (!next_usable_size) next_usable_size = (size_t (*)(void*))dlsym(RTLD_NEXT, "malloc_usable_size");
  return next_usable_size ? next_usable_size(p) : 0;
}

// For big_vision_lite/block_cache.py: live, kept-freed and peak-live bytes; blocks mapped,
// reused and unmapped since the process started; the size threshold; waits for a free, and
// those a freed block ended.
void bvl_block_cache_stats(uint64_t out[9]) {
  pthread_mutex_lock(&mu);
  out[0] = live_bytes;
  out[1] = freed_bytes;
  out[2] = peak_live_bytes;
  out[3] = n_mapped;
  out[4] = n_reused;
  out[5] = n_unmapped;
  out[6] = min_bytes;
  out[7] = n_waits;
  out[8] = n_waits_served;
  pthread_mutex_unlock(&mu);
}

static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }
// The child has one thread: none of the parent's waiters, whatever the condition recorded.
static void child(void) {
  n_waiting = 0;
  pthread_cond_init(&freed_cv, NULL);
  pthread_mutex_unlock(&mu);
}

// A whole number from the environment, or -1 where unset or not one (block_cache.py reports
// bad values before the restart).
static long long env_number(const char* name) {
  const char* s = getenv(name);
  if (!s || !*s) return -1;
  char* end;
  unsigned long long v = strtoull(s, &end, 10);
  return *end == '\0' && v <= (unsigned long long)1 << 62 ? (long long)v : -1;
}

__attribute__((constructor)) static void init(void) {
  long long v = env_number("BVL_BLOCK_CACHE_MIN_BYTES");
  if (v >= (long long)PAGE) min_bytes = (size_t)v;
  v = env_number("BVL_BLOCK_CACHE_WAIT_MS");
  if (v >= 0 && v <= 10000) wait_ms = HAVE_CLOCKWAIT ? (long)v : 0;
  v = env_number("BVL_BLOCK_CACHE_WAIT_MIN_BYTES");
  if (v >= (long long)PAGE) wait_min_bytes = (size_t)v;
  // A fork while another thread holds the lock would leave the child's copy locked.
  pthread_atfork(lock, unlock, child);
}
