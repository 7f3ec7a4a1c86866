/* Joins the tap records of one drain that continue each other, before JavaScript sees them.
 *
 * A keep-alive connection under load sends many small requests between two drains; each is a
 * record, and JavaScript's cost is per record. Here the records of a drain are grouped by flow
 * (in order of first appearance; a flow keeps its own order) and a record whose payload starts
 * where the previous one of its flow ended is appended to it. What comes out is what went in,
 * minus headers: the same bytes at the same sequence numbers. */
#ifndef MIRRORD_RECORD_MERGER_H
#define MIRRORD_RECORD_MERGER_H

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "tap.h"

class RecordMerger {
  public:
    explicit RecordMerger(size_t capacity) { staged_.reserve(capacity); }

    size_t stagedBytes() const { return staged_.size(); }

    static size_t padded(size_t size) {
        return (size + TAP_RECORD_ALIGN - 1) & ~size_t(TAP_RECORD_ALIGN - 1);
    }

    /* Copies one ring buffer record in. */
    void add(const void *data, size_t size) {
        size_t offset = staged_.size();
        staged_.resize(offset + padded(size));
        std::memcpy(staged_.data() + offset, data, size);
        const auto *header = reinterpret_cast<const tap_record *>(data);
        FlowKey key{};
        std::memcpy(key.data(), header->saddr, 16);
        std::memcpy(key.data() + 16, header->daddr, 16);
        std::memcpy(key.data() + 32, &header->sport, 2);
        std::memcpy(key.data() + 34, &header->dport, 2);
        key[36] = header->family;
        auto index = static_cast<uint32_t>(records_.size());
        records_.push_back(Staged{offset, kNone});
        auto [flow, inserted] = flows_.try_emplace(key, Flow{index, index});
        if (inserted) {
            order_.push_back(index);
        } else {
            records_[flow->second.tail].next = index;
            flow->second.tail = index;
        }
    }

    /* Writes the merged records to out (which holds at least stagedBytes()) and empties the
     * stage. Returns the bytes written. */
    size_t writeTo(uint8_t *out) {
        size_t length = 0;
        for (uint32_t head : order_) {
            tap_record *open = nullptr;
            for (uint32_t i = head; i != kNone; i = records_[i].next) {
                const uint8_t *record = staged_.data() + records_[i].offset;
                const auto *header = reinterpret_cast<const tap_record *>(record);
                if (open && continues(*open, *header)) {
                    std::memcpy(reinterpret_cast<uint8_t *>(open) + sizeof(tap_record) +
                                    open->payload_len,
                                record + sizeof(tap_record), header->payload_len);
                    open->payload_len += header->payload_len;
                    open->flags |= header->flags;
                    continue;
                }
                if (open)
                    length += padded(sizeof(tap_record) + open->payload_len);
                open = reinterpret_cast<tap_record *>(out + length);
                std::memcpy(open, record, sizeof(tap_record) + header->payload_len);
            }
            if (open)
                length += padded(sizeof(tap_record) + open->payload_len);
        }
        /* Padding bytes of the output stay as they were; readers skip them by length. */
        staged_.clear();
        records_.clear();
        flows_.clear();
        order_.clear();
        return length;
    }

  private:
    static constexpr uint32_t kNone = UINT32_MAX;
    static constexpr uint8_t kSyn = 0x02, kFin = 0x01, kRst = 0x04;

    /* A SYN or RST stays its own record (the reassembler reads them), and nothing is appended
     * after a FIN, so flags keep their meaning for the joined bytes. */
    static bool continues(const tap_record &open, const tap_record &next) {
        return !(open.flags & (kSyn | kFin | kRst)) && !(next.flags & (kSyn | kRst)) &&
               next.payload_len > 0 && next.seq == open.seq + open.payload_len;
    }

    using FlowKey = std::array<uint8_t, 37>;
    struct FlowKeyHash {
        size_t operator()(const FlowKey &key) const {
            uint64_t hash = 1469598103934665603ull; /* FNV-1a */
            for (uint8_t byte : key)
                hash = (hash ^ byte) * 1099511628211ull;
            return static_cast<size_t>(hash);
        }
    };
    struct Staged {
        size_t offset;
        uint32_t next;
    };
    struct Flow {
        uint32_t head;
        uint32_t tail;
    };

    std::vector<uint8_t> staged_;
    std::vector<Staged> records_;
    std::unordered_map<FlowKey, Flow, FlowKeyHash> flows_;
    std::vector<uint32_t> order_;
};

#endif
