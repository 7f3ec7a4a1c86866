/**
 * Frames: a u32 big-endian body length, then a body that is one msgpack array of wire messages
 * (see messages.ts). Batching many messages per frame amortises the per-write and per-decode
 * costs on the data path; the length prefix lets the decoder know how much to wait for without
 * trying to parse an incomplete msgpack value again and again.
 */
import type { Writable } from 'node:stream';
import { Packr, RESERVE_START_SPACE, Unpackr } from 'msgpackr';
import { FrameMemory } from './frame-memory.js';
import { ProtocolError, type WireMessage, type WireValue } from './messages.js';

/** Largest frame body accepted or produced. */
export const MAX_FRAME_SIZE = 16 * 1024 * 1024;

/**
 * Most messages in one frame. Decoded messages cost far more memory than their encoding (a
 * message can be 2 bytes on the wire and ~60 in the heap), so the byte limit alone would let a
 * 16 MiB frame of tiny messages expand to half a gigabyte.
 */
export const MAX_MESSAGES_PER_FRAME = 16384;

/**
 * Frame body → message → a feature's body → its lists (env's reply: body → pairs → pair is 5).
 * msgpackr decodes recursively, so checking this before decoding is what keeps a hostile
 * nesting from overflowing the stack.
 */
const MAX_DEPTH = 8;
/** Longest message (opened: code + 8 fields), with room for hello to grow. */
const MAX_MESSAGE_FIELDS = 16;
/**
 * A target's environment can hold thousands of variables (Kubernetes adds seven for each
 * Service of the namespace); the frame's count of values bounds the memory either way.
 */
const MAX_LIST_ITEMS = 65536;
/** Bounds the decoded heap size of a frame regardless of how its values are nested. */
const MAX_VALUES_PER_FRAME = MAX_MESSAGES_PER_FRAME * 16;

const HEADER_BYTES = 4;
/**
 * A frame spanning chunks up to this size gets its whole buffer at its header, and is copied
 * once (a file's 1 MiB pieces: growing by doubling cost their reader more copies and garbage
 * than the bytes themselves). A longer one grows by doubling from this size as its bytes
 * arrive, so that a header alone never makes the reader allocate more than this.
 */
const WHOLE_BODY_BYTES = 2 * 1024 * 1024;
/** Upper bound of a msgpack array32 / str32 / bin32 header. */
const MSGPACK_HEADER_BYTES = 5;

export interface FrameLimits {
  /** Largest body; defaults to {@link MAX_FRAME_SIZE}. */
  maxFrameSize?: number;
  /** Most messages per frame; defaults to {@link MAX_MESSAGES_PER_FRAME}. */
  maxMessagesPerFrame?: number;
}

export interface FrameEncoderOptions extends FrameLimits {
  /**
   * A frame is sealed before it would pass this many bytes, unless one message alone does
   * (default: only the limits cut frames). The reader decodes a frame that fits in one of its
   * chunks in place and copies one that spans chunks, so a sender of bulk data keeps its
   * frames to a socket read's size.
   */
  frameBytes?: number;
  /** Cut frames from reused memory (see FrameMemory): for a sender of bulk data. */
  reuseMemory?: boolean;
}

// Standard msgpack only: no records, and the decoder never sees an extension (scanBody rejects
// them), so no msgpackr-specific type can come in or go out.
const packr = new Packr({ useRecords: false });
// uint64/int64 from other msgpack implementations become numbers; validation then rejects the
// ones beyond 2^53 as non-integers instead of facing a bigint.
const unpackr = new Unpackr({ useRecords: false, int64AsType: 'number' });

/** What msgpackr may need beyond a value's size before it starts a buffer of its own. */
const PACK_SLACK_BYTES = 0x800 + 16;
/** Whether msgpackr's (module-wide) buffer is frame memory: see encodeFrame. */
let packingIntoFrameMemory = false;

/**
 * Encodes messages as one frame. The payloads are copied once, into the frame. With `memory`,
 * the frame is cut from that memory (room for `sizeBound`, an upper bound of the body that
 * messageSize gives when not given): give it back with `memory.written(frame)` once the stream
 * has written it.
 */
export function encodeFrame(
  messages: readonly WireMessage[],
  memory?: FrameMemory,
  sizeBound = memory ? messages.reduce((sum, message) => sum + messageSize(message), 0) : 0,
): Buffer {
  const room = memory?.room(HEADER_BYTES + sizeBound + PACK_SLACK_BYTES);
  if (room !== undefined) {
    // The whole slab, whose DataView msgpackr then keeps, and the position to start at.
    packr.useBuffer(room.slab);
    packr.position = room.offset;
    packingIntoFrameMemory = true;
  } else if (packingIntoFrameMemory) {
    // msgpackr goes on packing where its last frame ended: that frame memory may be reused
    // while this frame lives, so this frame gets a buffer of msgpackr's usual first size.
    packr.useBuffer(Buffer.allocUnsafeSlow(8192));
    packingIntoFrameMemory = false;
  }
  // The reserved start space lets msgpackr write the body right after room for the length, so
  // the frame is never copied again to prepend it.
  const frame = packr.pack(messages, RESERVE_START_SPACE | HEADER_BYTES);
  frame.writeUInt32BE(frame.length - HEADER_BYTES, 0);
  if (room !== undefined) memory?.cut(frame);
  return frame;
}

function valueSize(value: WireValue): number {
  if (typeof value === 'string') return MSGPACK_HEADER_BYTES + 3 * value.length;
  if (value instanceof Uint8Array) return MSGPACK_HEADER_BYTES + value.length;
  if (value !== null && typeof value === 'object') {
    let size = MSGPACK_HEADER_BYTES;
    for (const item of value) size += valueSize(item);
    return size;
  }
  return 9;
}

/**
 * Upper bound of a message's encoded size, computed without encoding it, so frames can be cut
 * before they pass the limit (3 bytes per UTF-16 unit is UTF-8's worst case).
 */
function messageSize(message: WireMessage): number {
  let size = MSGPACK_HEADER_BYTES;
  for (const value of message) size += valueSize(value);
  return size;
}

/**
 * Queues messages and encodes them into as few frames as the limits allow. It does no I/O: see
 * {@link FrameWriter}.
 */
export class FrameEncoder<M> {
  readonly #toWire: (message: M) => WireMessage;
  readonly #maxFrameSize: number;
  readonly #maxMessages: number;
  readonly #frameBytes: number;
  readonly #memory: FrameMemory | undefined;
  #batch: WireMessage[] = [];
  #batchBytes = MSGPACK_HEADER_BYTES;
  #frames: Buffer[] = [];
  #framesBytes = 0;

  constructor(toWire: (message: M) => WireMessage, options: FrameEncoderOptions = {}) {
    this.#toWire = toWire;
    this.#maxFrameSize = options.maxFrameSize ?? MAX_FRAME_SIZE;
    this.#maxMessages = options.maxMessagesPerFrame ?? MAX_MESSAGES_PER_FRAME;
    this.#frameBytes = Math.min(this.#maxFrameSize, options.frameBytes ?? this.#maxFrameSize);
    this.#memory = options.reuseMemory ? new FrameMemory() : undefined;
  }

  /** Bytes queued (an upper bound for the messages not yet encoded). */
  get pendingBytes(): number {
    return this.#framesBytes + this.#batchBytes - MSGPACK_HEADER_BYTES;
  }

  get pendingMessages(): number {
    return this.#batch.length;
  }

  /** Throws a RangeError if the message alone cannot fit in a frame: split payloads before. */
  push(message: M): void {
    const wire = this.#toWire(message);
    const size = messageSize(wire);
    if (MSGPACK_HEADER_BYTES + size > this.#maxFrameSize) {
      throw new RangeError(`a message of up to ${size} bytes cannot fit in a frame`);
    }
    if (this.#batch.length >= this.#maxMessages || this.#batchBytes + size > this.#frameBytes) {
      this.#seal();
    }
    this.#batch.push(wire);
    this.#batchBytes += size;
  }

  /** Encodes everything queued and hands the frames over, oldest first. */
  takeFrames(): Buffer[] {
    this.#seal();
    const frames = this.#frames;
    this.#frames = [];
    this.#framesBytes = 0;
    return frames;
  }

  /** The stream has written `frames`, from {@link takeFrames}: their memory may be reused. */
  written(frames: readonly Buffer[]): void {
    if (this.#memory === undefined) return;
    for (const frame of frames) this.#memory.written(frame);
  }

  /** Forgets everything queued. */
  clear(): void {
    this.written(this.#frames);
    this.#batch = [];
    this.#batchBytes = MSGPACK_HEADER_BYTES;
    this.#frames = [];
    this.#framesBytes = 0;
  }

  #seal(): void {
    if (this.#batch.length === 0) return;
    const frame = encodeFrame(this.#batch, this.#memory, this.#batchBytes);
    this.#batch = [];
    this.#batchBytes = MSGPACK_HEADER_BYTES;
    this.#frames.push(frame);
    this.#framesBytes += frame.length;
  }
}

export interface FrameWriterOptions extends FrameEncoderOptions {
  /** Longest a queued message waits before it is written anyway; 0 disables the timer. */
  flushIntervalMs?: number;
  /** Write as soon as this many bytes are queued. */
  flushBytes?: number;
}

/**
 * A {@link FrameEncoder} bound to a stream: messages are queued and written as one frame by
 * `flush()`, which also happens by itself once `flushBytes` are queued or `flushIntervalMs`
 * after the first queued message.
 */
export class FrameWriter<M> {
  readonly #stream: Writable;
  readonly #encoder: FrameEncoder<M>;
  readonly #flushBytes: number;
  readonly #flushIntervalMs: number;
  #timer: NodeJS.Timeout | undefined;

  constructor(stream: Writable, toWire: (message: M) => WireMessage, options: FrameWriterOptions) {
    this.#stream = stream;
    this.#encoder = new FrameEncoder(toWire, options);
    this.#flushBytes = options.flushBytes ?? 256 * 1024;
    this.#flushIntervalMs = options.flushIntervalMs ?? 0;
  }

  send(message: M): void {
    this.#encoder.push(message);
    if (this.#encoder.pendingBytes >= this.#flushBytes) {
      this.flush();
    } else if (this.#flushIntervalMs > 0 && this.#timer === undefined) {
      // One timer per batch, not per message.
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        this.flush();
      }, this.#flushIntervalMs);
    }
  }

  /** Writes what is queued. Returns false when the stream's buffer is full (wait for 'drain'). */
  flush(): boolean {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const stream = this.#stream;
    if (stream.destroyed || stream.writableEnded) {
      this.#encoder.clear();
      return false;
    }
    const frames = this.#encoder.takeFrames();
    if (frames.length > 1) stream.cork();
    const last = frames.length - 1;
    // A stream writes in order: once the last frame is written (or the stream failed), all are.
    for (let i = 0; i < last; i++) stream.write(frames[i]);
    if (last >= 0) stream.write(frames[last], () => this.#encoder.written(frames));
    if (frames.length > 1) stream.uncork();
    return !stream.writableNeedDrain;
  }

  /** Drops what is queued and stops the timer; used when the session is over. */
  close(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#encoder.clear();
  }
}

function scanError(offset: number, message: string): ProtocolError {
  return new ProtocolError(`malformed frame at byte ${offset}: ${message}`);
}

function needHeader(left: number, n: number, at: number): void {
  if (left < n) throw scanError(at, 'truncated (body ends inside a value header)');
}

/**
 * Walks the msgpack body without building anything, iteratively, and checks that it is exactly
 * one array of messages within every limit, using only the kinds this protocol uses. Only then
 * is the body handed to msgpackr, which therefore never recurses deeper than {@link MAX_DEPTH},
 * never meets an extension (records, structured-clone references…), and never allocates more
 * than the limits allow. Returns the number of messages.
 */
function scanBody(body: Uint8Array, maxMessages: number): number {
  const end = body.length;
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  // remaining[d]: elements still expected by the open array at depth d.
  const remaining = [0, 0, 0];
  let depth = 0;
  let pos = 0;
  let values = 0;
  let messages = 0;
  for (;;) {
    if (pos >= end) throw scanError(pos, 'truncated (body ends inside a value)');
    const at = pos;
    const token = body[pos++] as number;
    let arrayLength = -1;
    let skip = 0;
    if (token <= 0x7f || token >= 0xe0 || token === 0xc0 || token === 0xc2 || token === 0xc3) {
      // fixint, nil, bool: the token is the whole value
    } else if (token >= 0x90 && token <= 0x9f) {
      arrayLength = token & 0x0f;
    } else if (token >= 0xa0 && token <= 0xbf) {
      skip = token & 0x1f;
    } else {
      switch (token) {
        case 0xcc:
        case 0xd0:
          skip = 1;
          break;
        case 0xcd:
        case 0xd1:
          skip = 2;
          break;
        case 0xca:
        case 0xce:
        case 0xd2:
          skip = 4;
          break;
        case 0xcb:
        case 0xcf:
        case 0xd3:
          skip = 8;
          break;
        case 0xc4:
        case 0xd9:
          needHeader(end - pos, 1, at);
          skip = body[pos++] as number;
          break;
        case 0xc5:
        case 0xda:
          needHeader(end - pos, 2, at);
          skip = view.getUint16(pos);
          pos += 2;
          break;
        case 0xc6:
        case 0xdb:
          needHeader(end - pos, 4, at);
          skip = view.getUint32(pos);
          pos += 4;
          break;
        case 0xdc:
          needHeader(end - pos, 2, at);
          arrayLength = view.getUint16(pos);
          pos += 2;
          break;
        case 0xdd:
          needHeader(end - pos, 4, at);
          arrayLength = view.getUint32(pos);
          pos += 4;
          break;
        default:
          if ((token >= 0x80 && token <= 0x8f) || token === 0xde || token === 0xdf) {
            throw scanError(at, 'maps are not used by this protocol');
          }
          if (token === 0xc1) throw scanError(at, 'byte 0xc1 is never used in msgpack');
          throw scanError(
            at,
            `msgpack extension 0x${token.toString(16)} is not used by this protocol`,
          );
      }
    }
    if (++values > MAX_VALUES_PER_FRAME) {
      throw scanError(at, `more than ${MAX_VALUES_PER_FRAME} values in one frame`);
    }
    if (depth === 0 && arrayLength < 0) {
      throw scanError(at, 'the body is not an array of messages');
    }
    if (depth === 1 && arrayLength < 0) {
      throw scanError(at, `message ${messages - (remaining[0] as number)} is not an array`);
    }
    if (arrayLength >= 0) {
      if (depth === MAX_DEPTH) throw scanError(at, `nested deeper than ${MAX_DEPTH} levels`);
      const limit = depth === 0 ? maxMessages : depth === 1 ? MAX_MESSAGE_FIELDS : MAX_LIST_ITEMS;
      if (arrayLength > limit) {
        const what = depth === 0 ? 'messages in a frame' : depth === 1 ? 'fields' : 'list items';
        throw scanError(at, `${arrayLength} ${what}, the limit is ${limit}`);
      }
      if (arrayLength > end - pos) throw scanError(at, 'truncated (array longer than the body)');
      if (depth === 0) messages = arrayLength;
      if (arrayLength > 0) {
        remaining[depth++] = arrayLength;
        continue;
      }
    } else if (skip > end - pos) {
      throw scanError(at, 'truncated (value longer than the body)');
    } else {
      pos += skip;
    }
    // A value is complete: close every array it completes.
    for (;;) {
      if (depth === 0) {
        if (pos !== end) throw scanError(pos, `${end - pos} bytes after the array of messages`);
        return messages;
      }
      const left = (remaining[depth - 1] as number) - 1;
      remaining[depth - 1] = left;
      if (left > 0) break;
      depth--;
    }
  }
}

/**
 * Incremental frame decoder: feed it the stream's chunks as they come, get back the validated
 * messages of every frame they complete. Holds at most one incomplete frame (≤ maxFrameSize
 * plus its length). Any violation throws a {@link ProtocolError} and nothing else; the decoder
 * then stays failed, since the stream cannot be resynchronised.
 */
export class FrameDecoder<M> {
  readonly #parse: (value: unknown) => M;
  readonly #maxFrameSize: number;
  readonly #maxMessages: number;
  readonly #header = Buffer.alloc(HEADER_BYTES);
  #headerFill = 0;
  /** Length of the body being received, or -1 while reading a header. */
  #bodyLength = -1;
  /** The body of a frame that spans chunks, grown as its bytes arrive. */
  #body: Buffer | undefined;
  #bodyFill = 0;
  #failure: ProtocolError | undefined;

  constructor(parse: (value: unknown) => M, limits: FrameLimits = {}) {
    this.#parse = parse;
    this.#maxFrameSize = limits.maxFrameSize ?? MAX_FRAME_SIZE;
    this.#maxMessages = limits.maxMessagesPerFrame ?? MAX_MESSAGES_PER_FRAME;
  }

  /** Bytes held for an incomplete frame. */
  get bufferedBytes(): number {
    return this.#headerFill + this.#bodyFill;
  }

  push(chunk: Buffer): M[] {
    if (this.#failure) throw this.#failure;
    try {
      return this.#push(chunk);
    } catch (error) {
      this.#failure =
        error instanceof ProtocolError
          ? error
          : new ProtocolError(`undecodable frame: ${String(error)}`, { cause: error });
      this.#body = undefined;
      this.#bodyFill = 0;
      throw this.#failure;
    }
  }

  #push(chunk: Buffer): M[] {
    const out: M[] = [];
    let offset = 0;
    while (offset < chunk.length) {
      if (this.#bodyLength < 0) {
        let length: number;
        if (this.#headerFill === 0 && chunk.length - offset >= HEADER_BYTES) {
          length = chunk.readUInt32BE(offset);
          offset += HEADER_BYTES;
        } else {
          const n = Math.min(HEADER_BYTES - this.#headerFill, chunk.length - offset);
          chunk.copy(this.#header, this.#headerFill, offset, offset + n);
          this.#headerFill += n;
          offset += n;
          if (this.#headerFill < HEADER_BYTES) break;
          this.#headerFill = 0;
          length = this.#header.readUInt32BE(0);
        }
        if (length === 0) throw new ProtocolError('empty frame');
        if (length > this.#maxFrameSize) {
          throw new ProtocolError(
            `frame of ${length} bytes exceeds the limit of ${this.#maxFrameSize} bytes`,
          );
        }
        this.#bodyLength = length;
        continue;
      }
      const missing = this.#bodyLength - this.#bodyFill;
      const available = chunk.length - offset;
      if (this.#bodyFill === 0 && available >= missing) {
        // The whole body is in this chunk: decode it in place, no copy.
        this.#decode(chunk.subarray(offset, offset + missing), out);
        offset += missing;
      } else {
        const n = Math.min(missing, available);
        this.#append(chunk, offset, n);
        offset += n;
        if (this.#bodyFill === this.#bodyLength) {
          const body = (this.#body as Buffer).subarray(0, this.#bodyFill);
          this.#body = undefined;
          this.#bodyFill = 0;
          this.#decode(body, out);
        }
      }
    }
    return out;
  }

  /**
   * Copies part of a frame that spans chunks. The buffer grows with what actually arrived (not
   * with the declared length) so a peer cannot make us allocate 16 MiB with a 4-byte header,
   * and holding copies rather than the chunks keeps the cost per byte even for 1-byte chunks.
   */
  #append(chunk: Buffer, offset: number, n: number): void {
    const needed = this.#bodyFill + n;
    let body = this.#body;
    if (body === undefined || body.length < needed) {
      const size = Math.min(
        this.#bodyLength,
        Math.max(needed, body === undefined ? WHOLE_BODY_BYTES : 2 * body.length),
      );
      const grown = Buffer.allocUnsafe(size);
      if (body !== undefined) body.copy(grown, 0, 0, this.#bodyFill);
      this.#body = body = grown;
    }
    chunk.copy(body, this.#bodyFill, offset, offset + n);
    this.#bodyFill = needed;
  }

  #decode(body: Buffer, out: M[]): void {
    this.#bodyLength = -1;
    const count = scanBody(body, this.#maxMessages);
    let values: unknown;
    try {
      values = unpackr.unpack(body);
    } catch (error) {
      throw new ProtocolError(`undecodable frame: ${String(error)}`, { cause: error });
    }
    // scanBody guarantees an array of `count` arrays; the check keeps that assumption local.
    if (!Array.isArray(values) || values.length !== count) {
      throw new ProtocolError('frame decoded to something other than its array of messages');
    }
    for (const value of values) out.push(this.#parse(value));
  }
}
