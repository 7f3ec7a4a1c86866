/**
 * What C and TypeScript must agree on byte for byte, written once in each language and checked
 * here against the C compiler: the tap's record layout (agent-bpf/tap.h, which the BPF program
 * writes and src/agent/tap.ts parses) and the replay source address (layer/replay_source.h, which
 * the layer waits for and src/session/replay.ts connects from). Each test compiles a small
 * program with the real header and compares what it prints with the TypeScript constants.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TAP_RECORD_ALIGN, TAP_RECORD_FIELDS, TAP_RECORD_HEADER_BYTES } from '../src/agent/tap.js';
import { packageRoot } from '../src/package-root.js';
import { REPLAY_SOURCE } from '../src/session/replay.js';

let scratch: string;

beforeAll(() => {
  scratch = mkdtempSync(join(tmpdir(), 'mirrord-record-layout-'));
});

afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** Compiles `program` against the headers of `includeDir` (in the repository) and runs it. */
function compileAndRun(name: string, includeDir: string, program: string): string {
  const source = join(scratch, `${name}.c`);
  const binary = join(scratch, name);
  writeFileSync(source, program);
  const include = join(packageRoot(), includeDir);
  execFileSync('cc', ['-Wall', '-Werror', '-I', include, '-o', binary, source], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return execFileSync(binary, { encoding: 'utf8' });
}

describe('the tap record (agent-bpf/tap.h, src/agent/tap.ts)', () => {
  test('each field, the header size and the alignment are the same in C and TypeScript', () => {
    // A name TypeScript has and C has not fails the compilation.
    const fields = Object.keys(TAP_RECORD_FIELDS)
      .map((name) => `    FIELD(${name});`)
      .join('\n');
    const printed = compileAndRun(
      'tap-record',
      'agent-bpf',
      `#include <stddef.h>
#include <stdio.h>
#include "tap.h"

#define FIELD(name)                                                                 \\
    printf("field %s %zu %zu\\n", #name, offsetof(struct tap_record, name),          \\
           sizeof(((struct tap_record *)0)->name))

int main(void) {
    printf("header %zu\\n", sizeof(struct tap_record));
    printf("align %u\\n", TAP_RECORD_ALIGN);
${fields}
    return 0;
}
`,
    );
    const inC: {
      header?: number;
      align?: number;
      fields: Record<string, { offset: number; size: number }>;
    } = { fields: {} };
    for (const line of printed.trim().split('\n')) {
      const [kind, ...values] = line.split(' ');
      if (kind === 'field') {
        const [name = '', offset, size] = values;
        inC.fields[name] = { offset: Number(offset), size: Number(size) };
      } else if (kind === 'header' || kind === 'align') {
        inC[kind] = Number(values[0]);
      }
    }
    expect(inC).toEqual({
      header: TAP_RECORD_HEADER_BYTES,
      align: TAP_RECORD_ALIGN,
      fields: TAP_RECORD_FIELDS,
    });
  });

  test('the fields TypeScript knows cover the header without gap: C has no other field', () => {
    // With the test above, a field added in C only (or grown into the padding) shows here as a
    // gap, a changed header size or a moved field.
    const inOrder = Object.entries(TAP_RECORD_FIELDS).sort(([, a], [, b]) => a.offset - b.offset);
    const misfits: string[] = [];
    let end = 0;
    for (const [name, { offset, size }] of inOrder) {
      if (offset !== end)
        misfits.push(`${name} starts at ${offset}, the field before ends at ${end}`);
      end = offset + size;
    }
    if (end !== TAP_RECORD_HEADER_BYTES) {
      misfits.push(`the last field ends at ${end}, the header at ${TAP_RECORD_HEADER_BYTES}`);
    }
    expect(misfits).toEqual([]);
  });
});

describe('the replay source (layer/replay_source.h, src/session/replay.ts)', () => {
  test('the layer waits for connections from the address the replay connects from', () => {
    const printed = compileAndRun(
      'replay-source',
      'layer',
      `#include <stdio.h>
#include "replay_source.h"

int main(void) {
    printf("%u.%u.%u.%u\\n", replay_source_ipv4[0], replay_source_ipv4[1], replay_source_ipv4[2],
           replay_source_ipv4[3]);
    return 0;
}
`,
    );
    expect(printed.trim()).toBe(REPLAY_SOURCE);
  });
});
