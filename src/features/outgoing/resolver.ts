/**
 * Names resolved as the target resolves them, for the app's getaddrinfo: mirrord_resolver
 * (resolver.c) enters the target's network namespace and its view of the files and answers with
 * its /etc/hosts and resolv.conf (nameservers, search domains, ndots). It runs from the first
 * look-up on, answers many at once (a slow nameserver holds up only its own names), and is
 * started again after it dies.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { TapNetns } from '../../agent/tap.js';
import { packageRoot } from '../../package-root.js';

/** getaddrinfo's answer; `error` is its EAI name without `EAI_` ('NONAME', 'AGAIN'...). */
export type Resolution =
  | { error: null; canonicalName: string | null; addresses: string[] }
  | { error: string; canonicalName: null; addresses: [] };

/** The longest name DNS carries as text (RFC 1035's 255 octets on the wire). */
const MAX_NAME_BYTES = 253;

/** resolver.c's exit code when it cannot enter the target; its last stderr line says why. */
const START_FAILED = 2;

interface Waiting {
  resolve(resolution: Resolution): void;
  reject(error: Error): void;
}

/** One run of the program and the look-ups it has not answered yet. */
interface Run {
  child: ChildProcessWithoutNullStreams;
  waiting: Map<number, Waiting>;
  lastErrorLine: string;
}

function failed(error: string): Resolution {
  return { error, canonicalName: null, addresses: [] };
}

function resolverPath(): string {
  const path = join(packageRoot(), 'build', 'Release', 'mirrord_resolver');
  if (!existsSync(path)) throw new Error(`the resolver is not built (${path}); run npm run build`);
  return path;
}

export class TargetResolver {
  readonly #target: TapNetns;
  #run: Run | undefined;
  #lastId = 0;

  /**
   * `target`: a process, whose namespaces and root are entered, or a named netns, as `ip netns
   * exec` enters it.
   */
  constructor(target: TapNetns) {
    this.#target = target;
  }

  /**
   * Resolves `name` for IPv4 and IPv6 (0), or one of them. Rejects only when the program cannot
   * start (not built, no such target, no permission); its death answers 'FAIL'.
   */
  resolve(name: string, family: 0 | 4 | 6): Promise<Resolution> {
    // A query is one line of space-separated fields, and neither is ever a host name.
    if (/\s/.test(name) || Buffer.byteLength(name) > MAX_NAME_BYTES) {
      return Promise.resolve(failed('NONAME'));
    }
    return new Promise((resolve, reject) => {
      const run = this.#run ?? this.#start();
      this.#lastId += 1;
      run.waiting.set(this.#lastId, { resolve, reject });
      run.child.stdin.write(`${this.#lastId} ${family} ${name}\n`);
    });
  }

  /** Ends the program at once; look-ups under way answer 'FAIL'. A later look-up starts it anew. */
  close(): void {
    this.#run?.child.kill('SIGKILL');
    this.#run = undefined;
  }

  #start(): Run {
    const args =
      'pid' in this.#target ? ['--pid', String(this.#target.pid)] : ['--netns', this.#target.netns];
    const child = spawn(resolverPath(), args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const run: Run = { child, waiting: new Map(), lastErrorLine: '' };
    this.#run = run;
    createInterface({ input: child.stdout }).on('line', (line) => this.#answer(run, line));
    createInterface({ input: child.stderr }).on('line', (line) => {
      if (line) run.lastErrorLine = line;
    });
    // Writing to a program that died fails with EPIPE; its death is handled on 'close'.
    child.stdin.on('error', () => undefined);
    child.on('error', (error) => this.#end(run, error));
    // 'close' rather than 'exit': by then every answer it wrote before dying has been read.
    child.on('close', (code) => {
      const failure =
        code === START_FAILED
          ? new Error(run.lastErrorLine || `mirrord_resolver exited with code ${code}`)
          : undefined;
      this.#end(run, failure);
    });
    return run;
  }

  /** `ID ok CANON|- ADDR...` or `ID err CODE`. */
  #answer(run: Run, line: string): void {
    const [id, status, first = '-', ...rest] = line.split(' ');
    const waiting = run.waiting.get(Number(id));
    if (!waiting) return;
    run.waiting.delete(Number(id));
    waiting.resolve(
      status === 'ok'
        ? { error: null, canonicalName: first === '-' ? null : first, addresses: rest }
        : failed(first),
    );
  }

  #end(run: Run, failure: Error | undefined): void {
    if (this.#run === run) this.#run = undefined;
    for (const { resolve, reject } of run.waiting.values()) {
      if (failure) reject(failure);
      else resolve(failed('FAIL'));
    }
    run.waiting.clear();
  }
}
