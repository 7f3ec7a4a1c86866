// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* The tap: a TC ingress classifier that copies client→server TCP segments of subscribed ports
 * into a ring buffer. It only reads the skb and always returns TC_ACT_UNSPEC (== TCX_NEXT), so
 * the packet continues exactly as if the tap were not there and any later tcx/tc program still
 * runs; TC_ACT_OK would end the classification and skip filters queued after ours. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>

/* After the uapi headers, which define the types these use. */
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "tap.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff

/* Indexed by port (host order), non-zero when subscribed: an array lookup is inlined by the
 * verifier into a bounds check and an add, where a hash lookup is a call that hashes the key, and
 * it runs for every TCP segment that enters the target. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 65536);
    __type(key, __u32);
    __type(value, __u8);
} ports SEC(".maps");

/* max_entries is set by the loader (ringBufferBytes). */
struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 25);
} events SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct tap_counters);
} counters SEC(".maps");

struct scratch {
    struct tap_record rec;
    __u8 payload[TAP_CHUNK];
};

/* A record is assembled here before bpf_ringbuf_output: the ring buffer only reserves constant
 * sizes, and reserving 64 KiB for every small segment would waste it. A per-CPU array cannot
 * hold values over 32 KiB, hence a plain array indexed by CPU; TC runs with BH disabled, so two
 * programs never share a CPU's slot at once. max_entries is set to the possible CPU count by the
 * loader. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct scratch);
} scratch SEC(".maps");

/* Set by the consumer before it waits with nothing to do, cleared by the first record after. */
volatile __u32 consumer_idle;
/* Set with the wakeup sent for a filling ring, cleared by the consumer as it drains: until then
 * records do not wake it again. Each forced wakeup queues an irq_work (an interrupt, and in a VM
 * an exit), and a ring above the mark would otherwise send one per record until the consumer
 * runs. */
volatile __u32 wakeup_sent;
/* The ring buffer's size, set by the loader: one query fewer per record. */
const volatile __u64 ring_bytes = 0;

/* A wakeup costs the target a context switch, so records do not wake the consumer, which drains
 * on its own schedule while traffic flows (see Drainer in tap_addon.cc). Only the first
 * record after an idle spell wakes it, and a ring a quarter full wakes it early. */
static __always_inline __u64 ringbuf_wakeup(void) {
    if (consumer_idle) {
        consumer_idle = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    if (wakeup_sent || bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) <= ring_bytes / 4)
        return BPF_RB_NO_WAKEUP;
    wakeup_sent = 1;
    return BPF_RB_FORCE_WAKEUP;
}

static __always_inline int tap(struct __sk_buff *skb, const __u32 l2_len) {
    /* Addresses are kept here until the port is known to be subscribed. */
    __u8 family;
    __u8 saddr[16] = {}, daddr[16] = {};
    __u32 l4_off, l3_end;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, l2_len, &ip, sizeof(ip)))
            return TC_ACT_UNSPEC;
        /* Fragments carry no (or a partial) TCP header; TCP sets DF, so they are not expected. */
        if (ip.version != 4 || ip.protocol != IPPROTO_TCP || ip.ihl < 5 ||
            (ip.frag_off & bpf_htons(IP_MF | IP_OFFMASK)))
            return TC_ACT_UNSPEC;
        l4_off = l2_len + ip.ihl * 4;
        /* BIG TCP IPv4 skbs over 64 KiB carry tot_len 0. */
        l3_end = ip.tot_len ? l2_len + bpf_ntohs(ip.tot_len) : skb->len;
        family = 4;
        __builtin_memcpy(saddr, &ip.saddr, 4);
        __builtin_memcpy(daddr, &ip.daddr, 4);
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, l2_len, &ip6, sizeof(ip6)))
            return TC_ACT_UNSPEC;
        if (ip6.version != 6)
            return TC_ACT_UNSPEC;
        l4_off = l2_len + sizeof(ip6);
        /* BIG TCP IPv6 skbs over 64 KiB are jumbograms: payload_len 0 and a Hop-by-Hop header
         * with the real length, which skb->len also gives. Other extension headers are not
         * followed: TCP segments practically never carry them. */
        l3_end = ip6.payload_len ? l4_off + bpf_ntohs(ip6.payload_len) : skb->len;
        __u8 next = ip6.nexthdr;
        if (next == IPPROTO_HOPOPTS) {
            __u8 hbh[2]; /* next header, length in 8-byte units after the first 8 */
            if (bpf_skb_load_bytes(skb, l4_off, hbh, sizeof(hbh)))
                return TC_ACT_UNSPEC;
            next = hbh[0];
            l4_off += (hbh[1] + 1) * 8;
        }
        if (next != IPPROTO_TCP)
            return TC_ACT_UNSPEC;
        family = 6;
        __builtin_memcpy(saddr, &ip6.saddr, 16);
        __builtin_memcpy(daddr, &ip6.daddr, 16);
    } else {
        return TC_ACT_UNSPEC;
    }

    struct tcphdr th;
    if (bpf_skb_load_bytes(skb, l4_off, &th, sizeof(th)))
        return TC_ACT_UNSPEC;
    __u32 dport = bpf_ntohs(th.dest);
    __u8 *subscribed = bpf_map_lookup_elem(&ports, &dport);
    if (!subscribed || !*subscribed)
        return TC_ACT_UNSPEC;

    __u32 payload_off = l4_off + th.doff * 4;
    /* Ethernet trailer padding lies beyond l3_end; a bogus length beyond the skb is cut. */
    if (l3_end > skb->len)
        l3_end = skb->len;
    if (th.doff < 5 || payload_off > l3_end)
        return TC_ACT_UNSPEC;
    __u32 remaining = l3_end - payload_off;
    __u8 flags = ((__u8 *)&th)[13];
    if (remaining == 0 && !(flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)))
        return TC_ACT_UNSPEC;

    __u32 cpu = bpf_get_smp_processor_id();
    struct scratch *s = bpf_map_lookup_elem(&scratch, &cpu);
    __u32 zero = 0;
    struct tap_counters *c = bpf_map_lookup_elem(&counters, &zero);
    if (!s || !c)
        return TC_ACT_UNSPEC;
    struct tap_record *r = &s->rec;
    r->family = family;
    __builtin_memcpy(r->saddr, saddr, 16);
    __builtin_memcpy(r->daddr, daddr, 16);
    r->timestamp_ns = bpf_ktime_get_ns();
    r->ifindex = skb->ifindex;
    r->sport = bpf_ntohs(th.source);
    r->dport = dport;
    __builtin_memset(r->pad, 0, sizeof(r->pad));

    /* A SYN occupies one sequence number before the payload (TCP Fast Open). */
    __u32 seq = bpf_ntohl(th.seq);
    __u32 data_seq = seq + ((flags & TCP_FLAG_SYN) ? 1 : 0);
    __u32 done = 0;
    for (int i = 0; i < TAP_MAX_CHUNKS; i++) {
        __u32 len = remaining > TAP_CHUNK ? TAP_CHUNK : remaining;
        int last = len == remaining;
        /* Keeps clang from merging the bound into the branches above, so the verifier sees
         * len <= TAP_CHUNK on the register it checks. */
        asm volatile("" : "+r"(len));
        if (len > TAP_CHUNK)
            break;
        __u8 f = flags;
        if (i > 0)
            f &= ~TCP_FLAG_SYN;
        if (!last)
            f &= ~(TCP_FLAG_FIN | TCP_FLAG_RST | TCP_FLAG_PSH);
        r->seq = i == 0 ? seq : data_seq + done;
        r->flags = f;
        r->payload_len = len;
        if (len > 0 && bpf_skb_load_bytes(skb, payload_off + done, s->payload, len))
            break;
        if (bpf_ringbuf_output(&events, s, sizeof(*r) + len, ringbuf_wakeup())) {
            c->segments_dropped++;
            c->bytes_dropped += len;
        } else {
            c->segments_copied++;
            c->bytes_copied += len;
        }
        done += len;
        remaining -= len;
        if (last)
            return TC_ACT_UNSPEC;
    }
    /* The skb needs more than TAP_MAX_CHUNKS records, or could not be read: the rest is lost,
     * and counted as such. */
    c->segments_dropped++;
    c->bytes_dropped += remaining;
    return TC_ACT_UNSPEC;
}

/* For interfaces with an Ethernet header (veth, lo, physical NICs). */
SEC("tc")
int tap_eth(struct __sk_buff *skb) { return tap(skb, ETH_HLEN); }

/* For L3 interfaces (ipip, wireguard, tun) whose skbs start at the IP header. */
SEC("tc")
int tap_l3(struct __sk_buff *skb) { return tap(skb, 0); }

char LICENSE[] SEC("license") = "Dual MIT/GPL";
