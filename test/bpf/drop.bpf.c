// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* TEST ONLY. Drops every DROP_EVERY-th TCP segment that carries payload, so tests can force loss
 * and retransmission (netem is not available on the test machines). Attach on the egress of the
 * sender's interface:
 *   tc qdisc add dev X clsact
 *   tc filter add dev X egress bpf da obj agent-bpf/.output/drop.bpf.o sec tc
 * The count is per CPU, so drops land roughly, not exactly, every DROP_EVERY segments. */
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

#ifndef DROP_EVERY
#define DROP_EVERY 23
#endif

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} seen SEC(".maps");

SEC("tc")
int drop(struct __sk_buff *skb) {
    __u32 l4_off, l3_end;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.protocol != IPPROTO_TCP)
            return TC_ACT_OK;
        l4_off = ETH_HLEN + ip.ihl * 4;
        l3_end = ETH_HLEN + bpf_ntohs(ip.tot_len);
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) || ip6.nexthdr != IPPROTO_TCP)
            return TC_ACT_OK;
        l4_off = ETH_HLEN + sizeof(ip6);
        l3_end = l4_off + bpf_ntohs(ip6.payload_len);
    } else {
        return TC_ACT_OK;
    }
    struct tcphdr th;
    if (bpf_skb_load_bytes(skb, l4_off, &th, sizeof(th)) || l4_off + th.doff * 4 >= l3_end)
        return TC_ACT_OK;
    __u32 zero = 0;
    __u64 *n = bpf_map_lookup_elem(&seen, &zero);
    if (!n)
        return TC_ACT_OK;
    *n += 1;
    /* STOLEN, not SHOT: on egress a SHOT makes the send fail in the sender's own stack, which
     * simply sends the segment again; STOLEN reports success, so the loss looks like the wire's
     * and TCP must detect it and retransmit. */
    return *n % DROP_EVERY == 0 ? TC_ACT_STOLEN : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
