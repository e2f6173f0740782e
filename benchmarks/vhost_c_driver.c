/* A minimal C driver for vhost-net: the yardstick for vhostctl's Python driver.
 *
 * Same loop as vhostctl.bench on the vhost path, one queue pair: tap (IFF_VNET_HDR, 12-byte
 * header) + /dev/vhost-net + split rings in one shared mapping; VERSION_1, MRG_RXBUF and
 * (optionally) EVENT_IDX; descriptor i pinned to buffer i and a constant avail ring (in-order
 * completions), one avail-index store and at most one kick per batch, delayed interrupts
 * (wake after 3/4 of what is in flight).  The frames are byte-identical to vhostctl's
 * (IPv4/UDP to a foreign MAC, id in the payload), and the same host-side sockets are used: a
 * packet socket with the same classic-BPF sample filter on TX; on RX at most `window` frames in
 * flight, injected with one send() per frame, the fastest simple way measured (vhostctl sends
 * the same linear frames, a batch per sendmmsg).  So the yardstick is the best simple C, not a
 * mirror of our driver.
 *
 * Built by scripts/bench with gcc inside the VM; never shipped, nothing committed.
 *   vhost_c_driver --dir tx|rx --size N [--duration S] [--warmup S] [--ring N] [--batch N]
 *                  [--verify-every N] [--no-event-idx] [--tap NAME]
 * Prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/vhost.h>
#include <linux/virtio_config.h>
#include <linux/virtio_net.h>
#include <linux/virtio_ring.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define HDR 12
#define PAGE 4096UL
#define MAGIC 0x56484354u /* "VHCT" */
#define MAGIC_AT 42
#define ID_AT 46

static void die(const char *what)
{
	fprintf(stderr, "vhost_c_driver: %s: %s\n", what, strerror(errno));
	exit(1);
}

#define CHECK(x, what) do { if ((x) < 0) die(what); } while (0)

/* -- options ------------------------------------------------------------------------------ */
static const char *opt_dir = "tx", *opt_tap = "vhcbench%d";
static int opt_size = 64, opt_ring = 256, opt_batch = 64, opt_every = 64, opt_event_idx = 1;
static double opt_duration = 2.0, opt_warmup = 0.5;

/* -- frames: byte-identical to vhostctl.bench.bench_frame() ------------------------------- */
static void bench_frame(uint8_t *f, unsigned id, int size)
{
	static const uint8_t dst[6] = {0xfe, 0, 0, 0, 0, 2}, src[6] = {0xfe, 0, 0, 0, 0, 1};
	uint8_t *p = f;
	memcpy(p, dst, 6); memcpy(p + 6, src, 6); p[12] = 0x08; p[13] = 0;
	p = f + 14;
	p[0] = 0x45; p[1] = 0;
	*(uint16_t *)(p + 2) = htons(size - 14);
	*(uint16_t *)(p + 4) = htons(id & 0xffff);
	*(uint16_t *)(p + 6) = 0; p[8] = 64; p[9] = 17;
	*(uint16_t *)(p + 10) = 0;
	p[12] = 10; p[13] = 0; p[14] = 0; p[15] = 1;
	p[16] = 10; p[17] = 0; p[18] = 0; p[19] = 2;
	p = f + 34;
	*(uint16_t *)(p + 0) = htons(1024 + (id & 0x7fff));
	*(uint16_t *)(p + 2) = htons(4789);
	*(uint16_t *)(p + 4) = htons(size - 34);
	*(uint16_t *)(p + 6) = 0;
	*(uint32_t *)(f + MAGIC_AT) = htonl(MAGIC);
	*(uint32_t *)(f + ID_AT) = htonl(id);
	*(uint32_t *)(f + ID_AT + 4) = htonl(size);
	unsigned r = (id * 7) & 0xff;
	for (int i = ID_AT + 8, k = 0; i < size; i++, k++)
		f[i] = (r + (k % 256)) & 0xff;
}

/* -- phases: a timer flips them; the loop only reads a flag ------------------------------- */
static volatile sig_atomic_t phase; /* 0 warm-up, 1 measure, 2 stop */

static void arm(double s)
{
	struct itimerval it = {{0, 0}, {(time_t)s, (suseconds_t)((s - (time_t)s) * 1e6)}};
	if (!it.it_value.tv_sec && !it.it_value.tv_usec)
		it.it_value.tv_usec = 1;
	setitimer(ITIMER_REAL, &it, NULL);
}

static void on_alarm(int sig)
{
	(void)sig;
	if (++phase == 1)
		arm(opt_duration);
}

/* -- CPU of this thread and of the vhost workers ------------------------------------------- */
static char workers[16][64];
static int nworkers;

static int read_file(const char *path, char *buf, size_t n)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t r = read(fd, buf, n - 1);
	close(fd);
	if (r < 0)
		return -1;
	buf[r] = 0;
	return (int)r;
}

static void find_workers(void)
{
	char name[32], path[300], buf[512];
	snprintf(name, sizeof(name), "vhost-%d", getpid());
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	while (d && (e = readdir(d)) && nworkers < 16) {
		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
		if (read_file(path, buf, sizeof(buf)) > 0 && !strncmp(buf, name, strlen(name)) &&
		    buf[strlen(name)] == '\n')
			snprintf(workers[nworkers++], 64, "/proc/self/task/%.20s", e->d_name);
	}
	if (d)
		closedir(d);
	d = opendir("/proc");
	while (d && (e = readdir(d)) && nworkers < 16) {
		snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
		if (read_file(path, buf, sizeof(buf)) <= 0)
			continue;
		char *lp = strchr(buf, '('), *rp = strrchr(buf, ')');
		if (!lp || !rp)
			continue;
		*rp = 0;
		int ppid = 0;
		char state;
		if (!strcmp(lp + 1, name) && sscanf(rp + 2, "%c %d", &state, &ppid) == 2 && ppid == 2)
			snprintf(workers[nworkers++], 64, "/proc/%.20s", e->d_name);
	}
	if (d)
		closedir(d);
}

static uint64_t workers_ns(void)
{
	uint64_t t = 0;
	char path[96], buf[256];
	for (int i = 0; i < nworkers; i++) {
		snprintf(path, sizeof(path), "%s/schedstat", workers[i]);
		if (read_file(path, buf, sizeof(buf)) > 0)
			t += strtoull(buf, NULL, 10);
	}
	return t;
}

struct mark {
	double t, user, sys;
	uint64_t worker, kicks, irqs, packets, bytes, verify_ns;
};

static uint64_t kicks, irqs, packets, bytes_total, verify_ns;

static uint64_t thread_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static struct mark take_mark(void)
{
	struct mark m;
	struct timespec ts;
	struct rusage ru;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	getrusage(RUSAGE_THREAD, &ru);
	m.t = ts.tv_sec + ts.tv_nsec / 1e9;
	m.user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
	m.sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	m.worker = workers_ns();
	m.kicks = kicks; m.irqs = irqs; m.packets = packets; m.bytes = bytes_total;
	m.verify_ns = verify_ns;
	return m;
}

/* -- one split ring in our memory ------------------------------------------------------------ */
struct ring {
	unsigned num;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t avail_idx, last_used;
	int kick, call;
	uint64_t bufs_gpa, bufs_off; /* slot i at bufs_off + i * slot */
	unsigned slot;
};

static uint16_t *used_event(struct ring *r) { return &r->avail->ring[r->num]; }
static uint16_t *avail_event(struct ring *r) { return (uint16_t *)&r->used->ring[r->num]; }

static void do_kick(struct ring *r)
{
	uint64_t one = 1;
	CHECK(write(r->kick, &one, 8), "kick");
	kicks++;
}

static void publish(struct ring *r, unsigned k)
{
	uint16_t old = r->avail_idx, new = old + k;
	r->avail_idx = new;
	__atomic_store_n(&r->avail->idx, new, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	int need = opt_event_idx ? vring_need_event(*(volatile uint16_t *)avail_event(r), new, old)
				 : !(*(volatile uint16_t *)&r->used->flags & VRING_USED_F_NO_NOTIFY);
	if (need)
		do_kick(r);
}

static void irq_off(struct ring *r)
{
	if (opt_event_idx)
		*(volatile uint16_t *)used_event(r) = r->last_used - 1;
	else
		*(volatile uint16_t *)&r->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
}

/* Sleep until `after` more completions (EVENT_IDX) or any (without); 0 on timeout. */
static int wait_ring(struct ring *r, unsigned after, int err, int timeout_ms)
{
	uint16_t out = r->avail_idx - r->last_used;
	if (after > out)
		after = out;
	if (!after)
		after = 1;
	if (opt_event_idx)
		*(volatile uint16_t *)used_event(r) = r->last_used + after - 1;
	else
		*(volatile uint16_t *)&r->avail->flags = 0;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	int ready = (uint16_t)(__atomic_load_n(&r->used->idx, __ATOMIC_ACQUIRE) - r->last_used) >= after;
	if (!ready) {
		struct pollfd p[2] = {{r->call, POLLIN, 0}, {err, POLLIN, 0}};
		int n = poll(p, 2, timeout_ms);
		if (n < 0 && errno != EINTR)
			die("poll");
		if (n > 0 && (p[1].revents & POLLIN)) {
			fprintf(stderr, "vhost_c_driver: vhost signalled an error\n");
			exit(1);
		}
		uint64_t v;
		if (n > 0 && read(r->call, &v, 8) == 8)
			irqs += v;
		ready = n != 0;
	}
	irq_off(r);
	return ready;
}

/* -- host side: sample socket (TX) and send() injector (RX) ------------------------ */
static int sample_socket(const char *ifname, unsigned every)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, MAGIC_AT),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MAGIC, 0, 6),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ID_AT),
		BPF_STMT(BPF_ALU | BPF_AND | BPF_K, every - 1),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, 0x40000),
		BPF_STMT(BPF_RET | BPF_K, 0),
	};
	struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
	int s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0), big = 32 << 20;
	CHECK(s, "socket");
	CHECK(setsockopt(s, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)), "SO_ATTACH_FILTER");
	CHECK(setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)), "SO_RCVBUFFORCE");
	struct sockaddr_ll a = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
				.sll_ifindex = if_nametoindex(ifname)};
	CHECK(bind(s, (struct sockaddr *)&a, sizeof(a)), "bind");
	return s;
}

static uint8_t **templates;
static unsigned ntemplates;
static uint64_t verified, bad;

static void check_frame(const uint8_t *f, int len)
{
	if (ntohl(*(uint32_t *)(f + MAGIC_AT)) != MAGIC)
		return;
	unsigned id = ntohl(*(uint32_t *)(f + ID_AT));
	if (id < ntemplates && len == opt_size && !memcmp(templates[id], f, len))
		verified++;
	else
		bad++;
}

/* Check the TX samples, timed apart from driving (as vhostctl's bench does: verify_us). */
static void drain(int s)
{
	static uint8_t buf[65536];
	ssize_t n;
	uint64_t t = thread_ns();
	while ((n = recv(s, buf, sizeof(buf), MSG_DONTWAIT)) > 0)
		check_frame(buf, (int)n);
	verify_ns += thread_ns() - t;
}

/* Host -> tap the way the kernel likes best: one send() per linear frame on a plain AF_PACKET
 * socket.  Measured in the VM, about twice the frames of a PACKET_TX_RING (whose skbs are built
 * on the ring's pages, tpacket_fill_skb) and no slower than sendmmsg or PACKET_QDISC_BYPASS. */
struct injector {
	int s;
	unsigned n, cursor;
};

static void injector_open(struct injector *in, const char *ifname, unsigned n)
{
	in->s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
	CHECK(in->s, "socket");
	struct sockaddr_ll a = {.sll_family = AF_PACKET, .sll_protocol = 0,
				.sll_ifindex = if_nametoindex(ifname)};
	CHECK(bind(in->s, (struct sockaddr *)&a, sizeof(a)), "bind");
	in->n = n; in->cursor = 0;
}

static unsigned inject(struct injector *in, unsigned count)
{
	if (count > in->n)
		count = in->n;
	for (unsigned k = 0; k < count; k++)
		if (send(in->s, templates[(in->cursor + k) % ntemplates], opt_size, MSG_DONTWAIT) < 0)
			die("send(AF_PACKET)");
	in->cursor = (in->cursor + count) % in->n;
	return count;
}

/* -- setup ------------------------------------------------------------------------------------ */
static int tap_fd, vhost_fd, err_fd;
static char tap_name[IFNAMSIZ];
static struct ring rx, tx;
static uint8_t *mem;

static void ring_init(struct ring *r, uint64_t off, uint64_t bufs_off, unsigned slot, int writable)
{
	unsigned n = opt_ring;
	r->num = n;
	r->desc = (void *)(mem + off);
	r->avail = (void *)(mem + off + 16 * n);
	r->used = (void *)(mem + ((off + 16 * n + 6 + 2 * n + PAGE - 1) & ~(PAGE - 1)));
	r->bufs_off = bufs_off;
	r->slot = slot;
	for (unsigned i = 0; i < n; i++) {
		r->desc[i].addr = bufs_off + (uint64_t)i * slot; /* GPA == offset: one region at 0 */
		r->desc[i].len = writable ? slot : (unsigned)(HDR + opt_size);
		r->desc[i].flags = writable ? VRING_DESC_F_WRITE : 0;
		r->desc[i].next = 0;
		r->avail->ring[i] = i;
	}
	r->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	r->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	CHECK(r->kick, "eventfd");
	CHECK(r->call, "eventfd");
}

static uint64_t ring_end(uint64_t off)
{
	unsigned n = opt_ring;
	uint64_t used = (off + 16 * n + 6 + 2 * n + PAGE - 1) & ~(PAGE - 1);
	return (used + 6 + 8 * n + PAGE - 1) & ~(PAGE - 1);
}

static void setup(void)
{
	struct ifreq ifr = {0};
	tap_fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	CHECK(tap_fd, "open /dev/net/tun");
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL;
	strncpy(ifr.ifr_name, opt_tap, IFNAMSIZ - 1);
	CHECK(ioctl(tap_fd, TUNSETIFF, &ifr), "TUNSETIFF");
	memcpy(tap_name, ifr.ifr_name, IFNAMSIZ);
	tap_name[IFNAMSIZ - 1] = 0;
	int hdr = HDR;
	CHECK(ioctl(tap_fd, TUNSETVNETHDRSZ, &hdr), "TUNSETVNETHDRSZ");
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	CHECK(s, "socket");
	CHECK(ioctl(s, SIOCGIFFLAGS, &ifr), "SIOCGIFFLAGS");
	ifr.ifr_flags |= IFF_UP;
	CHECK(ioctl(s, SIOCSIFFLAGS, &ifr), "SIOCSIFFLAGS");
	close(s);

	vhost_fd = open("/dev/vhost-net", O_RDWR | O_CLOEXEC);
	CHECK(vhost_fd, "open /dev/vhost-net");
	CHECK(ioctl(vhost_fd, VHOST_SET_OWNER), "VHOST_SET_OWNER");
	uint64_t features;
	CHECK(ioctl(vhost_fd, VHOST_GET_FEATURES, &features), "VHOST_GET_FEATURES");
	features = (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_NET_F_MRG_RXBUF) |
		   (opt_event_idx ? 1ULL << VIRTIO_RING_F_EVENT_IDX : 0);
	CHECK(ioctl(vhost_fd, VHOST_SET_FEATURES, &features), "VHOST_SET_FEATURES");

	unsigned n = opt_ring, txslot = 2048, rxslot = 2048;
	while (txslot < (unsigned)(HDR + opt_size))
		txslot <<= 1;
	rxslot = txslot;
	uint64_t rx_off = 0, tx_off = ring_end(rx_off), tx_bufs = ring_end(tx_off);
	uint64_t rx_bufs = tx_bufs + (uint64_t)n * txslot, size = rx_bufs + (uint64_t)n * rxslot;
	size = (size + PAGE - 1) & ~(PAGE - 1);
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	struct vhost_memory *vm = calloc(1, sizeof(*vm) + sizeof(struct vhost_memory_region));
	vm->nregions = 1;
	vm->regions[0].guest_phys_addr = 0;
	vm->regions[0].memory_size = size;
	vm->regions[0].userspace_addr = (uint64_t)(uintptr_t)mem;
	CHECK(ioctl(vhost_fd, VHOST_SET_MEM_TABLE, vm), "VHOST_SET_MEM_TABLE");
	free(vm);

	ring_init(&rx, rx_off, rx_bufs, rxslot, 1);
	ring_init(&tx, tx_off, tx_bufs, txslot, 0);
	for (unsigned i = 0; i < n; i++)
		bench_frame(mem + tx_bufs + (uint64_t)i * txslot + HDR, i, opt_size);
	err_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	CHECK(err_fd, "eventfd");
	struct ring *rings[2] = {&rx, &tx};
	for (unsigned q = 0; q < 2; q++) {
		struct ring *r = rings[q];
		struct vhost_vring_state st = {q, n};
		CHECK(ioctl(vhost_fd, VHOST_SET_VRING_NUM, &st), "VHOST_SET_VRING_NUM");
		st.num = 0;
		CHECK(ioctl(vhost_fd, VHOST_SET_VRING_BASE, &st), "VHOST_SET_VRING_BASE");
		struct vhost_vring_addr a = {.index = q, .desc_user_addr = (uint64_t)(uintptr_t)r->desc,
					     .avail_user_addr = (uint64_t)(uintptr_t)r->avail,
					     .used_user_addr = (uint64_t)(uintptr_t)r->used};
		CHECK(ioctl(vhost_fd, VHOST_SET_VRING_ADDR, &a), "VHOST_SET_VRING_ADDR");
		struct vhost_vring_file f = {q, r->kick};
		CHECK(ioctl(vhost_fd, VHOST_SET_VRING_KICK, &f), "VHOST_SET_VRING_KICK");
		f.fd = r->call;
		CHECK(ioctl(vhost_fd, VHOST_SET_VRING_CALL, &f), "VHOST_SET_VRING_CALL");
		f.fd = err_fd;
		CHECK(ioctl(vhost_fd, VHOST_SET_VRING_ERR, &f), "VHOST_SET_VRING_ERR");
	}
	irq_off(&tx);
	irq_off(&rx);
	publish(&rx, n); /* every RX buffer, once */
	for (unsigned q = 0; q < 2; q++) {
		struct vhost_vring_file f = {q, tap_fd};
		CHECK(ioctl(vhost_fd, VHOST_NET_SET_BACKEND, &f), "VHOST_NET_SET_BACKEND");
	}
	do_kick(&rx);
	find_workers();
}

/* Harvest one ring in order; returns completions, adds the bytes written (RX). */
static unsigned harvest(struct ring *r, uint64_t *written)
{
	uint16_t u = __atomic_load_n(&r->used->idx, __ATOMIC_ACQUIRE);
	unsigned n = (uint16_t)(u - r->last_used);
	for (unsigned k = 0; k < n; k++) {
		struct vring_used_elem *e = &r->used->ring[(uint16_t)(r->last_used + k) % r->num];
		if (e->id != (uint16_t)(r->last_used + k) % r->num) {
			fprintf(stderr, "vhost_c_driver: completion out of order\n");
			exit(1);
		}
		if (written)
			*written += e->len - HDR;
	}
	r->last_used = u;
	return n;
}

/* -- the loops -------------------------------------------------------------------------------- */
static struct mark m0, m1;
static int seen;

static int step(void)
{
	if (phase != seen) {
		seen = phase;
		if (seen >= 1 && !m0.t)
			m0 = take_mark();
		if (seen >= 2) {
			m1 = take_mark();
			return 0;
		}
	}
	return 1;
}

static int64_t lost;

static void run_tx(void)
{
	int s = sample_socket(tap_name, opt_every);
	unsigned rounds = 0, idle = 0;
	while (step()) {
		harvest(&tx, NULL);
		unsigned free_ = tx.num - (uint16_t)(tx.avail_idx - tx.last_used);
		unsigned k = free_ / opt_batch * opt_batch; /* every whole batch that fits, at once */
		if (!(++rounds & 63)) /* as vhostctl's bench with 1 queue, every 64th */
			drain(s);
		if (k) {
			publish(&tx, k);
			packets += k;
			bytes_total += (uint64_t)k * opt_size;
			idle = 0;
		}
		/* then sleep until ~3/4 of the ring is done (at once if it already is) */
		if (!wait_ring(&tx, (tx.num * 3) / 4, err_fd, 2000) && !k && ++idle >= 5) {
			fprintf(stderr, "vhost_c_driver: TX stalled\n");
			exit(1);
		}
	}
	while ((uint16_t)(tx.avail_idx - tx.last_used)) {
		harvest(&tx, NULL);
		if ((uint16_t)(tx.avail_idx - tx.last_used))
			wait_ring(&tx, 1, err_fd, 2000);
	}
	drain(s);
}

/* Take RX completions, check every opt_every-th, give the buffers back; how many. */
static unsigned rx_round(uint64_t seen, uint64_t *written)
{
	uint16_t from = rx.last_used;
	unsigned n = harvest(&rx, written);
	for (unsigned k = 0; k < n; k++) {
		if ((seen + k) % opt_every)
			continue;
		struct vring_used_elem *e = &rx.used->ring[(uint16_t)(from + k) % rx.num];
		check_frame(mem + rx.bufs_off + (uint64_t)e->id * rx.slot + HDR, e->len - HDR);
	}
	if (n)
		publish(&rx, n);
	return n;
}

static void run_rx(void)
{
	char buf[32], path[64];
	snprintf(path, sizeof(path), "/sys/class/net/%s/tx_queue_len", tap_name);
	int qlen = read_file(path, buf, sizeof(buf)) > 0 ? atoi(buf) : 500;
	int64_t window = 2 * opt_ring < qlen - opt_batch ? 2 * opt_ring : qlen - opt_batch;
	unsigned nf = 1;
	while (nf <= window + opt_batch)
		nf <<= 1;
	free(templates);
	ntemplates = nf;
	templates = calloc(nf, sizeof(*templates));
	for (unsigned i = 0; i < nf; i++) {
		templates[i] = malloc(opt_size);
		bench_frame(templates[i], i, opt_size);
	}
	struct injector in;
	injector_open(&in, tap_name, nf);
	int64_t injected = 0, received = 0;
	int running = 1;
	unsigned idle = 0;
	for (;;) {
		int64_t out = injected - received - lost;
		if (running && (window - out >= opt_batch || out <= 0)) {
			injected += inject(&in, (unsigned)(window - (out > 0 ? out : 0)));
			out = injected - received - lost;
		}
		int ready = 1;
		if (out > 0) { /* a burst at a time */
			int64_t after = out < rx.num ? out : rx.num;
			after = after * 3 / 4 ? after * 3 / 4 : 1;
			ready = wait_ring(&rx, (unsigned)after, err_fd, 2000);
		}
		uint64_t written = 0;
		unsigned n = rx_round((uint64_t)received, &written);
		if (n) {
			received += n;
			packets = received;
			bytes_total += written;
			idle = 0;
		} else if (!ready && (!running || ++idle >= 5)) {
			lost += injected - received - lost;
		}
		if (running)
			running = step();
		else if (injected - received - lost <= 0)
			break;
	}
	for (;;) { /* stragglers (received counted the kernel's IPv6 frames too) */
		uint64_t written = 0;
		received += rx_round((uint64_t)received, &written);
		if (!wait_ring(&rx, 1, err_fd, 300))
			break;
	}
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
		if (!strcmp(a, "--dir")) opt_dir = v, i++;
		else if (!strcmp(a, "--size")) opt_size = atoi(v), i++;
		else if (!strcmp(a, "--duration")) opt_duration = atof(v), i++;
		else if (!strcmp(a, "--warmup")) opt_warmup = atof(v), i++;
		else if (!strcmp(a, "--ring")) opt_ring = atoi(v), i++;
		else if (!strcmp(a, "--batch")) opt_batch = atoi(v), i++;
		else if (!strcmp(a, "--verify-every")) opt_every = atoi(v), i++;
		else if (!strcmp(a, "--tap")) opt_tap = v, i++;
		else if (!strcmp(a, "--no-event-idx")) opt_event_idx = 0;
		else {
			fprintf(stderr, "usage: %s --dir tx|rx --size N [--duration S] [--warmup S] "
				"[--ring N] [--batch N] [--verify-every N] [--no-event-idx] [--tap NAME]\n",
				argv[0]);
			return 2;
		}
	}
	int is_tx = !strcmp(opt_dir, "tx");
	if ((!is_tx && strcmp(opt_dir, "rx")) || opt_size < 60 || opt_size > 1514 ||
	    opt_ring < 2 || (opt_ring & (opt_ring - 1)) || opt_batch < 1 || opt_batch > opt_ring ||
	    opt_every < 1 || (opt_every & (opt_every - 1))) {
		fprintf(stderr, "vhost_c_driver: bad arguments\n");
		return 2;
	}
	ntemplates = opt_ring;
	templates = calloc(ntemplates, sizeof(*templates));
	for (unsigned i = 0; i < ntemplates; i++) {
		templates[i] = malloc(opt_size);
		bench_frame(templates[i], i, opt_size);
	}
	setup();
	struct sigaction sa = {0};
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);
	phase = opt_warmup > 0 ? 0 : 1;
	seen = -1;
	arm(opt_warmup > 0 ? opt_warmup : opt_duration);
	if (is_tx)
		run_tx();
	else
		run_rx();
	double secs = m1.t - m0.t;
	uint64_t pk = m1.packets - m0.packets;
	double per = pk ? 1e6 / pk : 0;
	printf("{\"impl\": \"c\", \"direction\": \"%s\", \"size\": %d, \"ring\": %d, \"batch\": %d, "
	       "\"seconds\": %.6f, \"packets\": %llu, \"bytes\": %llu, \"pps\": %.1f, "
	       "\"gbps\": %.6f, \"cpu_user_us\": %.4f, \"cpu_sys_us\": %.4f, \"verify_us\": %.4f, "
	       "\"worker_us\": %.4f, \"workers\": %d, \"kicks\": %.6f, \"interrupts\": %.6f, "
	       "\"verified\": %llu, \"bad\": %llu, \"lost\": %lld, \"tap\": \"%s\"}\n",
	       opt_dir, opt_size, opt_ring, opt_batch, secs, (unsigned long long)pk,
	       (unsigned long long)(m1.bytes - m0.bytes), secs > 0 ? pk / secs : 0,
	       secs > 0 ? (m1.bytes - m0.bytes) * 8 / secs / 1e9 : 0, (m1.user - m0.user) * per,
	       (m1.sys - m0.sys) * per, pk ? (m1.verify_ns - m0.verify_ns) / 1e3 / pk : 0,
	       pk ? (m1.worker - m0.worker) / 1e3 / pk : 0, nworkers,
	       pk ? (double)(m1.kicks - m0.kicks) / pk : 0, pk ? (double)(m1.irqs - m0.irqs) / pk : 0,
	       (unsigned long long)verified, (unsigned long long)bad, (long long)lost,
	       tap_name);
	/* Detach first, then everything closes with the process: the tap goes with its last fd. */
	for (unsigned q = 0; q < 2; q++) {
		struct vhost_vring_file f = {q, -1};
		ioctl(vhost_fd, VHOST_NET_SET_BACKEND, &f);
	}
	return bad ? 1 : 0;
}
