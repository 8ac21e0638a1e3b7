// Egress Warden kernel side, compiled by bcc (agent/kernel/loader.py).
//
// Rules kept here (DESIGN.md, "Kernel side"):
// - only cgroup hooks and tracepoints: hardened kernels refuse kprobes, fentry and LSM;
// - only uapi context structs and helpers, so building against headers that are not the
//   running kernel's stays correct;
// - every verdict the kernel takes is reported on the ring buffer, and a full ring
//   buffer is counted, never silent.
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <linux/socket.h>

#ifndef EW_PIN_DIR
#define EW_PIN_DIR "/sys/fs/bpf/egress-warden"  // the agent passes its --pin-dir
#endif

#define MAX_WORKLOADS 256
#define MAX_CGROUP_DEPTH 16
// The default (v2) hierarchy has id 0: it is the "0::" line of /proc/PID/cgroup.
#define CGROUP2_HIERARCHY 0

// Event kinds: mirrored by agent/kernel/records.py.
#define EV_CONNECT 1
#define EV_SENDMSG 2
#define EV_SOCK_CREATE 3
#define EV_BACKSTOP 4
#define EV_EXEC 5
#define EV_EXIT 6
#define EV_CGROUP_ATTACH 7
#define EV_DNS_PENDING 8  // a DNS query from a network namespace where the proxy is not open yet

#define VERDICT_ALLOW 1
#define VERDICT_DENY 2
#define VERDICT_OBSERVE 3  // not allowed, let through because the workload is in monitor mode

#define MODE_ENFORCE 0
#define MODE_MONITOR 1

#define IPPROTO_ANY 0
#define PORT_ANY 0

#define SOCK_RAW_TYPE 3

struct workload_state {
    u32 active;
    u32 mode;
    u32 quarantined;
    u32 dns;  // port 53 goes to the agent's DNS proxy (the workload has fqdn rules)
    u64 generation;  // bumped on every policy change: the backstop re-checks cached verdicts
};

// LPM key: the workload, protocol and port are fixed-length leading bits, so one trie
// serves every workload and a rule "any port"/"any protocol" is the entry with 0 there.
struct allow_key {
    u32 prefixlen;
    u32 workload;
    u8 proto;
    u8 pad;
    u16 port;  // host order
    u8 addr[16];  // IPv6, IPv4 as ::ffff:a.b.c.d so IPv4-mapped IPv6 is checked as IPv4
};

struct allow_value {
    u64 expires_ns;  // CLOCK_MONOTONIC (bpf_ktime_get_ns); 0 = never
    u32 rule;
    u32 flags;
};

struct listen_key {
    u32 workload;
    u16 port;
    u16 pad;
};

struct event {
    u64 ktime_ns;
    u64 cgroup_id;
    u64 cookie;
    u32 kind;
    u32 workload;
    u32 pid;
    u32 tgid;
    u32 uid;
    u32 aux;
    u16 family;
    u16 dport;
    u16 sport;
    u8 proto;
    u8 verdict;
    u8 daddr[16];
    char comm[16];
    char path[128];
};

BPF_ARRAY(workloads, struct workload_state, MAX_WORKLOADS);
BPF_HASH(cgroup_workload, u64, u32, 4096);
BPF_HASH(listen_ports, struct listen_key, u8, 4096);
BPF_F_TABLE("lpm_trie", struct allow_key, struct allow_value, allow, 262144, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", u32, u32, members, 65536);

// Per workload cgroup and CPU, found without a lookup: bpf_get_local_storage gives the storage
// of the cgroup the running program is attached to, so the hooks learn their workload from
// where they are attached instead of hashing the caller's cgroup id (and walking its
// ancestors), and keep next to it the destinations this CPU last let the workload reach, under
// the workload generation they were judged by (a policy change makes them stale). The hooks
// run about every 15 us under a busy router and each map line they touch is a cache miss by
// then: lines are most of what a connect costs them (bench/foundation.py).
//
// The agent writes it once, right after attaching (an index, zeroed entries); until then the
// hooks find the workload by cgroup id and leave the entries alone. After that only the
// programs write it, each on its own CPU, so a program preempted mid-write is the one way two
// writers meet: a writer takes `writing` with a compare-and-swap, and a reader takes an entry
// only if no write was in progress when it began or ended and none was done in between.
#define VERDICT_CACHE_SIZE 4  // a router talks to a handful of providers
struct cached_verdict {
    u64 generation;  // 0: empty
    u64 expires_ns;  // the allow entry's (a DNS answer's lifetime); 0 = never
    u8 addr[16];
    u16 port;
    u8 proto;
    u8 pad[5];
};
struct guard {
    u32 workload_plus_one;  // 0: not written yet
    u32 seq;  // bumped by every write of an entry
    u64 writing;
    u32 next;  // the entry the next write replaces
    u32 pad;
    struct cached_verdict verdicts[VERDICT_CACHE_SIZE];  // the first shares the header's cache line
};
// bcc's BPF_CGROUP_STORAGE keys by (cgroup, attach type), one storage per hook; keyed by the
// cgroup id alone, every program of the agent shares one.
struct guard_table_t {
    u64 key;
    struct guard leaf;
    struct guard *(*lookup)(u64 *);
    int (*update)(u64 *, struct guard *);
    struct guard *(*get_local_storage)(u64);
};
__attribute__((section("maps/percpu_cgroup_storage"))) struct guard_table_t guard = {0};
BPF_ANNOTATE_KV_PAIR(guard, u64, struct guard);

#define unlikely(x) __builtin_expect(!!(x), 0)

// Per socket, written in process context (connect, sendmsg), where `current` is the
// process using the socket; the backstop runs in softirq, where it is not. It holds the
// socket's process, the last destination judged for it and what the socket sent since the
// agent last folded it into `traffic`: the backstop lets further packets to that destination
// through, counted in this one cache line (which the connect hook just wrote), without a trie
// or hash lookup, while the workload's generation (bumped on every policy change) is unchanged.
struct sock_info {
    u64 cookie;  // the socket it describes; 0 while being rewritten
    u64 generation;
    u8 addr[16];
    u32 tgid;  // 0: not known (a socket no hook of the workload saw being connected)
    u16 workload;
    u16 port;
    u8 proto;
    u8 listen;  // a reply on one of the workload's listen ports: counted per port
    u8 kept;  // its tgid is in sock_owners too
    u8 pad;
    u32 seen;  // packets it let through (not atomic: only decides when to keep the owner)
    u64 packets;  // not yet in `traffic`: the agent folds them in (ew_fold), a rewrite too
    u64 bytes;
};

// One slot per socket, at cookie % SOCK_SLOTS: a write is a few stores, where a hash or LRU
// update (or socket storage) costs 0.8-1 us per connect, most of the connect hook's time
// (measured, kernel.bpf_stats_enabled). Two sockets 2^18 cookies apart share a slot; the
// later one wins, and the earlier one's packets take the slow path (a trie lookup) from then
// on. So a socket's owner outlives that: sockets that pass KEEP_OWNER_AFTER packets (not
// short requests) also get an LRU entry. Both pinned: owners and unfolded counts survive an
// agent restart. Mmapable, because that puts the values on a page boundary: one slot, one
// cache line (and `warden` reads unfolded counts without an agent through it).
#define SOCK_SLOTS 262144
#define KEEP_OWNER_AFTER 16
#define BPF_F_MMAPABLE_FLAG (1U << 10)
BPF_TABLE_PINNED("array", u32, struct sock_info, sock_slots, SOCK_SLOTS, EW_PIN_DIR "/sock_slots", BPF_F_MMAPABLE_FLAG);
BPF_TABLE_PINNED("lru_hash", u64, u32, sock_owners, 65536, EW_PIN_DIR "/sock_owners");

#define compiler_barrier() asm volatile("" ::: "memory")

// Outbound bytes and packets per workload, process and destination; the agent reads it
// (agent/traffic). Pinned, so totals survive an agent restart; LRU, so it stays bounded.
struct traffic_key {
    u32 workload;
    u32 tgid;
    u8 addr[16];  // zero for the listen bucket
    u16 port;  // destination port; the listen port for the listen bucket
    u8 proto;
    u8 listen;
    u32 pad;
};
struct traffic_value {
    u64 bytes;
    u64 packets;
};
BPF_TABLE_PINNED("lru_hash", struct traffic_key, struct traffic_value, traffic, 65536, EW_PIN_DIR "/traffic");

static __always_inline void add_traffic(struct traffic_key *key, u64 bytes, u64 packets) {
    struct traffic_value *v = traffic.lookup(key);
    if (!v) {
        struct traffic_value first = {.bytes = bytes, .packets = packets};
        if (traffic.insert(key, &first) == 0)
            return;
        v = traffic.lookup(key);  // another CPU inserted it first
        if (!v)
            return;
    }
    __sync_fetch_and_add(&v->bytes, bytes);
    __sync_fetch_and_add(&v->packets, packets);
}

static __always_inline u32 slot_index(u64 cookie) {
    return cookie & (SOCK_SLOTS - 1);
}

static __always_inline struct sock_info *slot_of(u64 cookie) {
    u32 index = slot_index(cookie);
    return sock_slots.lookup(&index);
}

static __always_inline void slot_traffic_key(struct sock_info *slot, struct traffic_key *key) {
    key->workload = slot->workload;
    key->tgid = slot->tgid;
    key->proto = slot->proto;
    key->port = slot->port;
    key->listen = slot->listen;
    if (!slot->listen)
        __builtin_memcpy(key->addr, slot->addr, 16);
}

static __always_inline int same_traffic_key(const struct traffic_key *a, const struct traffic_key *b) {
    const u32 *x = (const u32 *)a, *y = (const u32 *)b;
    for (int i = 0; i < sizeof(*a) / sizeof(u32); i++)
        if (x[i] != y[i])
            return 0;
    return 1;
}

// Counts taken out of slots and not yet added to `traffic`, all under one key: neighbouring
// slots are a router's successive sockets, mostly to one provider, so a fold adds a run of
// them with one lookup and one add instead of one each.
struct fold_run {
    struct traffic_key key;
    u64 bytes;
    u64 packets;
};

static __always_inline void flush_run(struct fold_run *run) {
    if (run->bytes || run->packets)
        add_traffic(&run->key, run->bytes, run->packets);
    run->bytes = run->packets = 0;
}

// What a slot counted goes into the run, under the slot's process and destination (the run
// flushed first when it holds another's). Each counter is taken with an exchange, so a packet
// counted meanwhile on another CPU goes in with the next fold: never lost, never twice (one
// fold may take its bytes, the next its packet count).
static __always_inline void take_slot(struct fold_run *run, struct sock_info *slot) {
    if (!slot->packets && !slot->bytes)
        return;
    struct traffic_key key = {};
    slot_traffic_key(slot, &key);
    if (!same_traffic_key(&key, &run->key)) {
        flush_run(run);
        run->key = key;
    }
    run->bytes += __sync_lock_test_and_set(&slot->bytes, 0);
    run->packets += __sync_lock_test_and_set(&slot->packets, 0);
}

static __always_inline void fold_slot(struct sock_info *slot) {
    struct fold_run run = {};
    take_slot(&run, slot);
    flush_run(&run);
}

// One bit per slot, set while all the slot counted is in `traffic`. All clear in a new agent's
// map, so its first fold takes whatever the agent before it left in the pinned slots; after
// that, a slot rewrite (the connect hook) and the agent's fold read only slots with something
// to fold (the slot's line is a cache miss by then; the bit's line, which the neighbouring
// sockets just used, is not). A count is added before its bit is cleared, and a fold sets a
// region's bits with an exchange before it reads the region's slots (all of them full
// barriers), so each count is either seen by the fold that sets its bit or clears it again for
// the next one.
#define FOLD_REGION_SLOTS 64  // the slots of one word of `folded`; ew_fold folds one region per run
#define ALL_FOLDED (~0ULL)
BPF_ARRAY(folded, u64, SOCK_SLOTS / FOLD_REGION_SLOTS);

static __always_inline u64 *folded_word(u32 index) {
    u32 region = index / FOLD_REGION_SLOTS;
    return folded.lookup(&region);
}

static __always_inline u64 folded_bit(u32 index) {
    return 1ULL << (index % FOLD_REGION_SLOTS);
}

static __always_inline int slot_folded(u32 index) {
    u64 *word = folded_word(index);
    return word && (*word & folded_bit(index));
}

static __always_inline void mark_unfolded(u32 index) {
    u64 *word = folded_word(index);
    if (word && (*word & folded_bit(index)))
        __sync_fetch_and_and(word, ~folded_bit(index));
}

static __always_inline void count_in_slot(struct sock_info *slot, u64 cookie, u32 len) {
    __sync_fetch_and_add(&slot->bytes, len);
    __sync_fetch_and_add(&slot->packets, 1);
    mark_unfolded(slot_index(cookie));
}

// A slot is rewritten with its cookie cleared and read with the cookie checked before and
// after (a sequence lock: x86 and arm64 JITs keep the order the compiler barriers fix), so
// a reader never takes half of one socket's entry and half of another's. What it counted
// for its previous socket or destination is folded first.
static __always_inline struct sock_info *write_slot(u64 cookie, u32 tgid, u8 kept, u64 generation, u32 wl,
                                                    const u8 addr[16], u8 proto, u16 port, u8 listen) {
    struct sock_info *slot = slot_of(cookie);
    if (!slot)
        return 0;
    if (!slot_folded(slot_index(cookie)))
        fold_slot(slot);
    slot->cookie = 0;
    compiler_barrier();
    slot->generation = generation;
    __builtin_memcpy(slot->addr, addr, 16);
    slot->tgid = tgid;
    slot->workload = wl;
    slot->port = port;
    slot->proto = proto;
    slot->listen = listen;
    slot->kept = kept;
    slot->seen = 0;
    compiler_barrier();
    slot->cookie = cookie;
    return slot;
}

static __always_inline int read_slot(u64 cookie, struct sock_info *out, struct sock_info **slot_out) {
    struct sock_info *slot = slot_of(cookie);
    if (!slot || slot->cookie != cookie)
        return 0;
    compiler_barrier();
    __builtin_memcpy(out, slot, sizeof(*out));
    compiler_barrier();
    *slot_out = slot;
    return slot->cookie == cookie;
}

BPF_ARRAY(config, u32, 4);  // [0]: exec events for discovery wanted
BPF_PERCPU_ARRAY(lost_events, u64, 1);
// Backstop denials already reported, by socket cookie and policy generation: one report
// per socket and policy, not one per dropped packet.
struct reported_key {
    u64 cookie;
    u64 generation;
};
BPF_TABLE("lru_hash", struct reported_key, u8, backstop_reported, 16384);
BPF_RINGBUF_OUTPUT(events, 1024);  // pages: 4 MiB

// DNS redirection (agent/dns). The proxy listens on loopback inside every network
// namespace where the workload has processes, one port per namespace and workload.
#define DNS_PORT 53
struct dns_proxy_key {
    u64 netns;  // bpf_get_netns_cookie
    u32 workload;
    u32 pad;
};
BPF_HASH(dns_proxy, struct dns_proxy_key, u32, 4096);  // value: the proxy's port, host order
// The resolver a redirected socket asked, so replies and getpeername show it, not the proxy.
struct dns_origin {
    u8 addr[16];  // as the socket wrote it (IPv4 as ::ffff:a.b.c.d)
    u16 port;  // network order
    u16 proxy_port;  // network order
    u32 pad;
};
BPF_TABLE("lru_hash", u64, struct dns_origin, dns_origin, 65536);

static __always_inline void emit(struct event *ev) {
    if (events.ringbuf_output(ev, sizeof(*ev), 0) < 0) {
        u32 zero = 0;
        u64 *lost = lost_events.lookup(&zero);
        if (lost)
            __sync_fetch_and_add(lost, 1);
    }
}

static __always_inline int workload_of_cgroup(u64 id, u32 *wl) {
    u32 *found = cgroup_workload.lookup(&id);
    if (!found)
        return 0;
    *wl = *found;
    return 1;
}

// The workload of the calling task: its cgroup or the nearest ancestor that is a
// workload's, so sub-cgroups a router makes stay under its policy.
static __always_inline int workload_of_current(u32 *wl) {
    if (workload_of_cgroup(bpf_get_current_cgroup_id(), wl))
        return 1;
    for (int level = MAX_CGROUP_DEPTH - 1; level >= 1; level--) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (id && workload_of_cgroup(id, wl))
            return 1;
    }
    return 0;
}

static __always_inline int workload_of_skb(struct __sk_buff *skb, u32 *wl) {
    if (workload_of_cgroup(bpf_skb_cgroup_id(skb), wl))
        return 1;
    for (int level = MAX_CGROUP_DEPTH - 1; level >= 1; level--) {
        u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
        if (id && workload_of_cgroup(id, wl))
            return 1;
    }
    return 0;
}

static __always_inline struct workload_state *active_state(u32 *wl) {
    struct workload_state *st = workloads.lookup(wl);
    return st && st->active ? st : 0;
}

// The storage of the cgroup the running program is attached to (and so of the socket or task
// it judges), once the agent has named the workload in it; NULL in the moment before.
static __always_inline struct guard *attached_guard(void) {
    struct guard *g = guard.get_local_storage(0);
    return g->workload_plus_one ? g : 0;
}

static __always_inline struct workload_state *named_workload(struct guard *g, u32 *wl) {
    *wl = g->workload_plus_one - 1;
    return active_state(wl);
}

// The active workload a cgroup hook runs for, or NULL where the policy guards nothing.
static __always_inline struct workload_state *guarded_workload_of_current(struct guard *g, u32 *wl) {
    if (unlikely(!g))
        return workload_of_current(wl) ? active_state(wl) : 0;
    return named_workload(g, wl);
}

static __always_inline struct workload_state *guarded_workload_of_skb(struct guard *g, struct __sk_buff *skb,
                                                                      u32 *wl) {
    if (unlikely(!g))
        return workload_of_skb(skb, wl) ? active_state(wl) : 0;
    return named_workload(g, wl);
}

// An expired entry (a DNS answer's lifetime is over) refuses new connections only: the
// backstop passes `honour_expiry` 0, so established ones go on until the agent removes the
// entry, which it does once no socket uses it.
static __always_inline int lookup_allowed(struct allow_key *key, u8 proto, u16 port, int honour_expiry,
                                          u64 *expires_ns) {
    key->proto = proto;
    key->port = port;
    struct allow_value *v = allow.lookup(key);
    if (!v)
        return 0;
    *expires_ns = v->expires_ns;
    return !honour_expiry || v->expires_ns == 0 || v->expires_ns > bpf_ktime_get_ns();
}

// "any protocol" rules are in the trie three times (tcp, udp, any: agent/kernel/loader.py),
// so a judgement takes two lookups: the port, then any port. The backstop does not honour
// expiry: an address whose DNS lifetime ended closes nothing already established.
static __always_inline int destination_allowed(u32 wl, const u8 addr[16], u8 proto, u16 port, int honour_expiry,
                                               u64 *expires_ns) {
    struct allow_key key = {};
    key.prefixlen = 64 + 128;
    key.workload = wl;
    __builtin_memcpy(key.addr, addr, 16);
    u8 listed = proto == IPPROTO_TCP || proto == IPPROTO_UDP ? proto : IPPROTO_ANY;
    return lookup_allowed(&key, listed, port, honour_expiry, expires_ns) ||
           lookup_allowed(&key, listed, PORT_ANY, honour_expiry, expires_ns);
}

static __always_inline int same_address(const u8 a[16], const u8 b[16]) {
    const u64 *x = (const u64 *)a, *y = (const u64 *)b;
    return x[0] == y[0] && x[1] == y[1];
}

static __always_inline int cache_holds(struct guard *c, u64 generation, const u8 addr[16], u8 proto,
                                       u16 port) {
    if (*(volatile u64 *)&c->writing)
        return 0;
    u32 seq = *(volatile u32 *)&c->seq;
    compiler_barrier();
    int found = 0;
#pragma unroll
    for (int i = 0; i < VERDICT_CACHE_SIZE; i++) {
        struct cached_verdict *e = &c->verdicts[i];
        if (e->generation == generation && e->port == port && e->proto == proto && same_address(e->addr, addr)) {
            found = e->expires_ns == 0 || e->expires_ns > bpf_ktime_get_ns();
            break;
        }
    }
    compiler_barrier();
    return found && *(volatile u32 *)&c->seq == seq && !*(volatile u64 *)&c->writing;
}

static __always_inline void cache_put(struct guard *c, u64 generation, const u8 addr[16], u8 proto, u16 port,
                                      u64 expires_ns) {
    if (__sync_val_compare_and_swap(&c->writing, 0, 1) != 0)
        return;  // a program this one preempted is writing
    struct cached_verdict *e = &c->verdicts[c->next & (VERDICT_CACHE_SIZE - 1)];
    c->next++;
    e->generation = generation;
    e->expires_ns = expires_ns;
    __builtin_memcpy(e->addr, addr, 16);
    e->port = port;
    e->proto = proto;
    compiler_barrier();
    c->seq++;
    compiler_barrier();
    c->writing = 0;
}

static __always_inline void ipv4_mapped(u32 ip4_be, u8 out[16]) {
    __builtin_memset(out, 0, 10);
    out[10] = 0xff;
    out[11] = 0xff;
    __builtin_memcpy(out + 12, &ip4_be, 4);
}

static __always_inline int verdict_for(struct workload_state *st, int allowed) {
    if (allowed && !st->quarantined)
        return VERDICT_ALLOW;
    return st->mode == MODE_MONITOR && !st->quarantined ? VERDICT_OBSERVE : VERDICT_DENY;
}

static __always_inline void fill_task(struct event *ev) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    ev->pid = (u32)pid_tgid;
    ev->tgid = pid_tgid >> 32;
    ev->uid = (u32)bpf_get_current_uid_gid();
    bpf_get_current_comm(ev->comm, sizeof(ev->comm));
    ev->cgroup_id = bpf_get_current_cgroup_id();
    ev->ktime_ns = bpf_ktime_get_ns();
}

static __always_inline int is_ipv4_mapped(const u8 a[16]) {
    u64 high;
    u32 mid;
    __builtin_memcpy(&high, a, 8);
    __builtin_memcpy(&mid, a + 8, 4);
    return high == 0 && mid == bpf_htonl(0xffff);
}

static __always_inline void report_sock_addr(u32 kind, u32 wl, int verdict, u64 cookie, const u8 addr[16], u8 proto,
                                             u16 port, int v6) {
    struct event ev = {};
    fill_task(&ev);
    ev.kind = kind;
    ev.workload = wl;
    ev.verdict = verdict;
    ev.cookie = cookie;
    ev.family = v6 ? AF_INET6 : AF_INET;
    ev.dport = port;
    ev.proto = proto;
    __builtin_memcpy(ev.daddr, addr, 16);
    emit(&ev);
}

// Port 53 of a DNS workload goes to its proxy in the caller's network namespace, whatever
// resolver was asked; the allowlist does not judge it (the proxy does, name by name).
// No proxy there yet: refused (no query leaves unjudged), and the agent is told to open one.
static __always_inline int redirect_dns(struct bpf_sock_addr *ctx, u32 wl, struct workload_state *st,
                                        const u8 addr[16], int v6) {
    struct dns_proxy_key pk = {.netns = bpf_get_netns_cookie(ctx), .workload = wl};
    u32 *port = dns_proxy.lookup(&pk);
    if (!port) {
        report_sock_addr(EV_DNS_PENDING, wl, st->mode == MODE_MONITOR ? VERDICT_OBSERVE : VERDICT_DENY,
                         bpf_get_socket_cookie(ctx), addr, (u8)ctx->protocol, DNS_PORT, v6);
        return st->mode == MODE_MONITOR;
    }
    struct dns_origin origin = {};
    __builtin_memcpy(origin.addr, addr, 16);
    origin.port = bpf_htons(DNS_PORT);
    origin.proxy_port = bpf_htons((u16)*port);
    u64 cookie = bpf_get_socket_cookie(ctx);
    dns_origin.update(&cookie, &origin);
    if (!v6) {
        ctx->user_ip4 = bpf_htonl(0x7f000001);
    } else if (is_ipv4_mapped(addr)) {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = bpf_htonl(0xffff);
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = bpf_htonl(1);
    }
    ctx->user_port = origin.proxy_port;
    return 1;
}

// recvmsg and getpeername of a redirected socket: what came from the proxy appears to come
// from the resolver the socket asked, so resolvers that check the reply's source accept it.
static __always_inline int restore_dns_origin(struct bpf_sock_addr *ctx, int v6) {
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct dns_origin *origin = dns_origin.lookup(&cookie);
    if (!origin || ctx->user_port != origin->proxy_port)
        return 1;
    if (!v6) {
        if (ctx->user_ip4 != bpf_htonl(0x7f000001))
            return 1;
        u32 ip4;
        __builtin_memcpy(&ip4, origin->addr + 12, 4);
        ctx->user_ip4 = ip4;
    } else {
        u32 w3 = ctx->user_ip6[3];
        u32 w2 = ctx->user_ip6[2];
        int from_proxy = ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
                         ((w2 == 0 && w3 == bpf_htonl(1)) || (w2 == bpf_htonl(0xffff) && w3 == bpf_htonl(0x7f000001)));
        if (!from_proxy)
            return 1;
        u32 ip6[4];
        __builtin_memcpy(ip6, origin->addr, 16);
        ctx->user_ip6[0] = ip6[0];
        ctx->user_ip6[1] = ip6[1];
        ctx->user_ip6[2] = ip6[2];
        ctx->user_ip6[3] = ip6[3];
    }
    ctx->user_port = origin->port;
    return 1;
}

int ew_recvmsg4(struct bpf_sock_addr *ctx) { return restore_dns_origin(ctx, 0); }
int ew_recvmsg6(struct bpf_sock_addr *ctx) { return restore_dns_origin(ctx, 1); }
int ew_getpeername4(struct bpf_sock_addr *ctx) { return restore_dns_origin(ctx, 0); }
int ew_getpeername6(struct bpf_sock_addr *ctx) { return restore_dns_origin(ctx, 1); }

// A destination this CPU let the workload reach a moment ago, under the same policy, comes
// from the cgroup's storage; anything else from the trie.
static __always_inline int judge_destination(struct guard *g, struct workload_state *st, u32 wl, const u8 addr[16],
                                             u8 proto, u16 port) {
    if (st->quarantined)
        return verdict_for(st, 0);
    if (g && cache_holds(g, st->generation, addr, proto, port))
        return VERDICT_ALLOW;
    u64 expires_ns = 0;
    int allowed = destination_allowed(wl, addr, proto, port, 1, &expires_ns);
    if (allowed && g)
        cache_put(g, st->generation, addr, proto, port, expires_ns);
    return verdict_for(st, allowed);
}

// connect4/6 and sendmsg4/6 share one check. Returns 1 to let the call through, 0 for EPERM.
// An allowed call builds no record: the hooks run on every connect of a busy router.
static __always_inline int check_sock_addr(struct bpf_sock_addr *ctx, u32 kind, int v6) {
    struct guard *g = attached_guard();
    u32 wl;
    struct workload_state *st = guarded_workload_of_current(g, &wl);
    if (!st)
        return 1;

    u8 addr[16];
    if (v6) {
        u32 ip6[4];
        ip6[0] = ctx->user_ip6[0];
        ip6[1] = ctx->user_ip6[1];
        ip6[2] = ctx->user_ip6[2];
        ip6[3] = ctx->user_ip6[3];
        __builtin_memcpy(addr, ip6, 16);
    } else {
        ipv4_mapped(ctx->user_ip4, addr);
    }
    u16 port = bpf_ntohs((u16)ctx->user_port);
    u8 proto = (u8)ctx->protocol;

    if (unlikely(st->dns && port == DNS_PORT && !st->quarantined))
        return redirect_dns(ctx, wl, st, addr, v6);

    int verdict = judge_destination(g, st, wl, addr, proto, port);
    u64 cookie = bpf_get_socket_cookie(ctx);
    if (verdict != VERDICT_DENY) {
        write_slot(cookie, bpf_get_current_pid_tgid() >> 32, 0, st->generation, wl, addr, proto, port, 0);
        if (verdict == VERDICT_ALLOW)
            return 1;
    }
    report_sock_addr(kind, wl, verdict, cookie, addr, proto, port, v6);
    return verdict == VERDICT_OBSERVE;
}

int ew_connect4(struct bpf_sock_addr *ctx) { return check_sock_addr(ctx, EV_CONNECT, 0); }
int ew_connect6(struct bpf_sock_addr *ctx) { return check_sock_addr(ctx, EV_CONNECT, 1); }
int ew_sendmsg4(struct bpf_sock_addr *ctx) { return check_sock_addr(ctx, EV_SENDMSG, 0); }
int ew_sendmsg6(struct bpf_sock_addr *ctx) { return check_sock_addr(ctx, EV_SENDMSG, 1); }

// Raw IP sockets bypass every address hook, so they are refused at creation.
int ew_sock_create(struct bpf_sock *sk) {
    if (sk->type != SOCK_RAW_TYPE)
        return 1;
    u32 wl;
    struct workload_state *st = guarded_workload_of_current(attached_guard(), &wl);
    if (!st)
        return 1;
    struct event ev = {};
    fill_task(&ev);
    ev.kind = EV_SOCK_CREATE;
    ev.workload = wl;
    ev.family = sk->family;
    ev.proto = sk->protocol;
    ev.aux = sk->type;
    ev.verdict = verdict_for(st, 0);
    emit(&ev);
    return ev.verdict == VERDICT_OBSERVE;
}

struct packet_dest {
    u8 addr[16];
    u16 dport;
    u16 sport;
    u8 proto;
    u8 has_ports;
    u16 family;
};

// Headers of locally sent packets are in the skb's linear part: read them in place, and
// through the helper (a call and a copy) only when they are not. In place word by word: from
// a void pointer clang copies a byte at a time (an IPv4 header took 60 instructions). Our
// offsets are multiples of 4 from the network header, and x86-64 and arm64 load unaligned
// words anyway.
static __always_inline int load_bytes(struct __sk_buff *skb, u32 offset, void *to, u32 len) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (offset <= 64 && data + offset + len <= end) {
        __builtin_memcpy(to, (const u32 *)(data + offset), len);
        return 0;
    }
    return bpf_skb_load_bytes(skb, offset, to, len);
}

static __always_inline int parse_ports(struct __sk_buff *skb, u32 offset, struct packet_dest *d) {
    if (d->proto != IPPROTO_TCP && d->proto != IPPROTO_UDP)
        return 0;
    u16 ports[2];
    if (load_bytes(skb, offset, ports, sizeof(ports)) < 0)
        return -1;
    d->sport = bpf_ntohs(ports[0]);
    d->dport = bpf_ntohs(ports[1]);
    d->has_ports = 1;
    return 0;
}

static __always_inline int parse_packet(struct __sk_buff *skb, struct packet_dest *d) {
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
            return -1;
        ipv4_mapped(ip.daddr, d->addr);
        d->proto = ip.protocol;
        d->family = AF_INET;
        // Only the first fragment carries the ports; later ones match "any port" rules only.
        if (ip.frag_off & bpf_htons(0x1fff))
            return 0;
        return parse_ports(skb, ip.ihl * 4, d);
    }
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
            return -1;
        __builtin_memcpy(d->addr, &ip6.daddr, 16);
        // Extension headers are not walked: such packets match only "any port" rules.
        d->proto = ip6.nexthdr;
        d->family = AF_INET6;
        return parse_ports(skb, sizeof(ip6), d);
    }
    return -1;
}

static __always_inline int is_loopback(const u8 a[16]) {
    u64 high;
    u32 w2, w3;
    __builtin_memcpy(&high, a, 8);
    __builtin_memcpy(&w2, a + 8, 4);
    __builtin_memcpy(&w3, a + 12, 4);
    return high == 0 && ((w2 == 0 && w3 == bpf_htonl(1)) || (w2 == bpf_htonl(0xffff) && a[12] == 127));
}

// A packet to the workload's DNS proxy in this network namespace (a query redirected above).
static __always_inline int to_dns_proxy(struct __sk_buff *skb, u32 wl, struct packet_dest *d) {
    if (!is_loopback(d->addr))
        return 0;
    struct dns_proxy_key pk = {.netns = bpf_get_netns_cookie(skb), .workload = wl};
    u32 *port = dns_proxy.lookup(&pk);
    return port && *port == d->dport;
}

static __always_inline int is_listen_reply(u32 wl, struct packet_dest *d) {
    struct listen_key lk = {.workload = wl, .port = d->sport};
    return d->has_ports && d->proto == IPPROTO_TCP && listen_ports.lookup(&lk);
}

// A packet without ports (a later fragment, another protocol) has no socket destination for a
// slot to be judged by: it goes into `traffic` itself.
static __always_inline void count_portless(u32 tgid, u32 wl, struct packet_dest *d, u32 len) {
    struct traffic_key key = {};
    key.workload = wl;
    key.tgid = tgid;
    key.proto = d->proto;
    __builtin_memcpy(key.addr, d->addr, 16);
    add_traffic(&key, len, 1);
}

static __always_inline void report_backstop(struct __sk_buff *skb, u64 cookie, struct workload_state *st, u32 wl,
                                            struct packet_dest *d, int verdict) {
    struct reported_key rk = {.cookie = cookie, .generation = st->generation};
    if (backstop_reported.lookup(&rk))
        return;
    u8 one = 1;
    backstop_reported.update(&rk, &one);
    struct event ev = {};
    ev.ktime_ns = bpf_ktime_get_ns();
    ev.kind = EV_BACKSTOP;
    ev.workload = wl;
    ev.verdict = verdict;
    ev.cgroup_id = bpf_skb_cgroup_id(skb);
    ev.cookie = rk.cookie;
    ev.family = d->family;
    ev.proto = d->proto;
    ev.dport = d->dport;
    ev.sport = d->sport;
    __builtin_memcpy(ev.daddr, d->addr, 16);
    ev.aux = skb->len;
    emit(&ev);
}

// The backstop and the byte counter: every packet a workload's sockets send, including
// sockets no address hook saw (opened before enforcement began) and connections a policy
// reload revoked. A packet to the destination its socket was last judged for, under the
// workload's current generation, is counted and let through without a trie lookup.
int ew_egress(struct __sk_buff *skb) {
    struct packet_dest d = {};
    if (parse_packet(skb, &d) < 0)
        return 1;  // not IP: nothing the allowlist speaks of

    u64 cookie = bpf_get_socket_cookie(skb);
    struct sock_info info;
    struct sock_info *slot = 0;
    int known = read_slot(cookie, &info, &slot);
    if (known) {
        u32 cached_wl = info.workload;
        struct workload_state *cached = workloads.lookup(&cached_wl);
        if (cached && cached->active && cached->generation == info.generation && info.proto == d.proto &&
            (info.listen ? info.port == d.sport : info.port == d.dport && same_address(info.addr, d.addr))) {
            count_in_slot(slot, cookie, skb->len);
            if (!info.kept && info.tgid && ++slot->seen >= KEEP_OWNER_AFTER) {
                slot->kept = 1;
                sock_owners.update(&cookie, &info.tgid);
            }
            return 1;
        }
    }

    u32 wl;
    struct workload_state *st = guarded_workload_of_skb(attached_guard(), skb, &wl);
    if (!st)
        return 1;
    int listen = is_listen_reply(wl, &d);
    u64 expires_ns;
    int verdict = verdict_for(st, listen ||
                                  destination_allowed(wl, d.addr, d.proto, d.has_ports ? d.dport : PORT_ANY, 0, &expires_ns) ||
                                  (d.has_ports && to_dns_proxy(skb, wl, &d)));
    if (verdict != VERDICT_ALLOW)
        report_backstop(skb, cookie, st, wl, &d, verdict);
    if (verdict == VERDICT_DENY)
        return 0;
    u32 tgid = 0;
    u8 kept = 0;
    if (known) {
        tgid = info.tgid;
        kept = info.kept;
    } else {
        u32 *owner = sock_owners.lookup(&cookie);  // its slot was taken by a later socket
        if (owner) {
            tgid = *owner;
            kept = 1;
        }
    }
    struct sock_info *counted = d.has_ports ? write_slot(cookie, tgid, kept, st->generation, wl, d.addr, d.proto,
                                                         listen ? d.sport : d.dport, listen) : 0;
    if (counted)
        count_in_slot(counted, cookie, skb->len);
    else
        count_portless(tgid, wl, &d, skb->len);
    return 1;
}

// Run by the agent through BPF_PROG_TEST_RUN (it is never attached) before it reads
// `traffic`: each run folds the next region's slots that are not folded, so one run per region
// (one syscall) folds every count.
BPF_ARRAY(fold_cursor, u32, 1);
int ew_fold(struct __sk_buff *skb) {
    u32 zero = 0;
    u32 *cursor = fold_cursor.lookup(&zero);
    if (!cursor)
        return 0;
    u32 region = *cursor % (SOCK_SLOTS / FOLD_REGION_SLOTS);
    *cursor = region + 1;
    u64 *word = folded.lookup(&region);
    if (!word || *word == ALL_FOLDED)
        return 0;
    u64 was = __sync_lock_test_and_set(word, ALL_FOLDED);
    struct fold_run run = {};
    for (u32 i = 0; i < FOLD_REGION_SLOTS; i++) {
        u32 index = region * FOLD_REGION_SLOTS + i;
        struct sock_info *slot = sock_slots.lookup(&index);
        if (!slot)
            break;
        if (!(was & folded_bit(index)))
            take_slot(&run, slot);
    }
    flush_run(&run);
    return 0;
}

// Membership by tgid lets cgroup_attach_task tell a workload process leaving its cgroup. What
// an escaped member forks is a member too (it is the workload's, wherever it runs), so the
// agent can bring back what the escaped process forked before it was returned.
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 wl;
    if (!workload_of_current(&wl)) {
        u32 parent = bpf_get_current_pid_tgid() >> 32;
        u32 *member = members.lookup(&parent);
        if (!member)
            return 0;
        wl = *member;
    }
    u32 child = args->child_pid;
    members.update(&child, &wl);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 wl;
    int member = workload_of_current(&wl);
    u32 zero = 0;
    u32 *discovery = config.lookup(&zero);
    if (!member && !(discovery && *discovery))
        return 0;
    struct event ev = {};
    fill_task(&ev);
    ev.kind = EV_EXEC;
    ev.workload = member ? wl : (u32)-1;
    ev.aux = args->old_pid;
    u32 loc = args->data_loc_filename;
    bpf_probe_read_kernel_str(ev.path, sizeof(ev.path), (void *)args + (loc & 0xffff));
    if (member) {
        u32 tgid = ev.tgid;
        members.update(&tgid, &wl);
    }
    emit(&ev);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if ((u32)pid_tgid != tgid)
        return 0;  // a thread, not the process
    u32 *wl = members.lookup(&tgid);
    if (!wl)
        return 0;
    struct event ev = {};
    fill_task(&ev);
    ev.kind = EV_EXIT;
    ev.workload = *wl;
    members.delete(&tgid);
    emit(&ev);
    return 0;
}

// Fires after the move, in the writer's context: `pid` is the moved process.
TRACEPOINT_PROBE(cgroup, cgroup_attach_task) {
    if (args->dst_root != CGROUP2_HIERARCHY)
        return 0;
    u32 moved = args->pid;
    u64 dst = args->dst_id;
    u32 dst_wl;
    int into_workload = workload_of_cgroup(dst, &dst_wl);
    u32 from_wl = (u32)-1;
    u32 *from = members.lookup(&moved);
    if (from)
        from_wl = *from;
    if (!into_workload && from_wl == (u32)-1)
        return 0;
    struct event ev = {};
    fill_task(&ev);  // the writer
    ev.kind = EV_CGROUP_ATTACH;
    ev.workload = from_wl;
    ev.aux = moved;
    ev.cgroup_id = dst;
    u32 loc = args->data_loc_dst_path;
    bpf_probe_read_kernel_str(ev.path, sizeof(ev.path), (void *)args + (loc & 0xffff));
    if (into_workload)
        members.update(&moved, &dst_wl);
    emit(&ev);
    return 0;
}
