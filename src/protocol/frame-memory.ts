/**
 * Memory that frames are encoded into and that is used again once the stream has written them.
 *
 * A sender of bulk data (the agent mirroring a 2 Gbit/s stream) encodes a frame for every 64 KiB.
 * Encoded into fresh buffers, they are garbage as soon as the socket has taken them, and V8 frees
 * them only at its next scavenge: the agent held 30 MiB of dead frames between two scavenges, and
 * glibc kept the pages afterwards (its RSS went from 80 to 120 MiB). Here frames are cut from
 * slabs, and a slab whose frames have all been written is cut again from its start.
 */

/** A slab holds several frames of the agent's 64 KiB; a larger frame gets a slab of its own. */
const SLAB_BYTES = 256 * 1024;
/** Slabs kept for reuse after a burst; beyond these, written slabs are left to the GC. */
const SPARE_SLABS = 4;
/**
 * Slabs of one large frame each (a file's 1 MiB pieces) kept for reuse, and the step their
 * sizes are rounded up to so that pieces of nearly the same size share them.
 */
const SPARE_LARGE_SLABS = 4;
const LARGE_SLAB_STEP = 256 * 1024;

interface Slab {
  memory: Buffer;
  /** Bytes cut from the start of `memory` for frames. */
  used: number;
  /** Frames cut from it and not yet written. */
  unwritten: number;
}

export class FrameMemory {
  readonly #slabs = new Map<ArrayBufferLike, Slab>();
  readonly #spare: Slab[] = [];
  readonly #spareLarge: Slab[] = [];
  #current: Slab | undefined;
  /** The large slab of the last {@link room}, until {@link cut}. */
  #large: Slab | undefined;

  /**
   * Where a frame of at most `bytes` may be encoded: a slab and the offset of its free part.
   * Give the frame to {@link cut}.
   */
  room(bytes: number): { slab: Buffer; offset: number } {
    if (bytes > SLAB_BYTES / 2) {
      // One whose frame never came to cut (its encoding failed) is free again.
      if (this.#large !== undefined) this.#retire(this.#large);
      const at = this.#spareLarge.findIndex((spare) => spare.memory.length >= bytes);
      this.#large =
        at >= 0
          ? this.#spareLarge.splice(at, 1)[0]!
          : this.#newSlab(Math.ceil(bytes / LARGE_SLAB_STEP) * LARGE_SLAB_STEP);
      return { slab: this.#large.memory, offset: 0 };
    }
    let slab = this.#current;
    if (slab === undefined || SLAB_BYTES - slab.used < bytes) {
      if (slab !== undefined) this.#retire(slab);
      slab = this.#spare.pop() ?? this.#newSlab();
      this.#current = slab;
    }
    return { slab: slab.memory, offset: slab.used };
  }

  /**
   * Records that `frame` was encoded in the last {@link room}: that memory is taken until
   * {@link written}. A frame the encoder put elsewhere is ignored.
   */
  cut(frame: Buffer): void {
    const large = this.#large;
    this.#large = undefined;
    if (large !== undefined) {
      if (frame.buffer === large.memory.buffer) large.unwritten = 1;
      else this.#retire(large);
      return;
    }
    const slab = this.#current;
    if (slab === undefined || frame.buffer !== slab.memory.buffer) return;
    // 8-byte aligned starts, as the encoder aligns its own buffers for faster copies.
    slab.used = Math.min(SLAB_BYTES, (frame.byteOffset + frame.length + 7) & ~7);
    slab.unwritten += 1;
  }

  /** The stream has written `frame` (or failed to): its memory may be reused. */
  written(frame: Buffer): void {
    const slab = this.#slabs.get(frame.buffer);
    if (slab === undefined) return;
    slab.unwritten -= 1;
    if (slab.unwritten > 0) return;
    slab.used = 0;
    if (slab !== this.#current) this.#retire(slab);
  }

  /** Bytes of slab memory allocated and not yet given up to the GC (for tests). */
  get allocatedBytes(): number {
    let bytes = 0;
    for (const slab of this.#slabs.values()) bytes += slab.memory.length;
    return bytes;
  }

  #newSlab(bytes = SLAB_BYTES): Slab {
    const slab: Slab = { memory: Buffer.allocUnsafeSlow(bytes), used: 0, unwritten: 0 };
    this.#slabs.set(slab.memory.buffer, slab);
    return slab;
  }

  /** A slab that is no longer cut from: spare once its frames are written, or given up. */
  #retire(slab: Slab): void {
    if (this.#current === slab) this.#current = undefined;
    if (slab.unwritten > 0) return;
    slab.used = 0;
    const [spare, most] =
      slab.memory.length > SLAB_BYTES
        ? [this.#spareLarge, SPARE_LARGE_SLABS]
        : [this.#spare, SPARE_SLABS];
    if (spare.length < most) spare.push(slab);
    else this.#slabs.delete(slab.memory.buffer);
  }
}
