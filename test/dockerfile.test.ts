/**
 * The agent image, the real one: test/cluster/images.sh builds docker/agent.Dockerfile with
 * buildah into an OCI archive and imports it into the test cluster's containerd, where the
 * agent Jobs run it. This test takes that archive (checked to be the image containerd holds
 * under the default agent image's name), unpacks its layers in order into a directory as a
 * container runtime would, and inspects the result, running the image's own programs there with
 * chroot: it holds no build toolchain, no dev dependency and no sources; it has what the agent
 * needs (node, `mirrord` on its PATH as its entrypoint, the addon, which loads with the image's
 * own libraries, and the compiled CLI); and its size stays within a stated budget. That the
 * Job's command runs from this image against a real target is the kube-mirror tests' part.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  createReadStream,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  type Stats,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { createGunzip } from 'node:zlib';
import { ensureCluster } from './cluster/cluster.js';
import { CACHE, CONTAINERD_SOCKET } from './cluster/layout.js';
import { agentJobManifest, defaultAgentImage } from '../src/platform/kube/agent-job.js';
import { packageRoot } from '../src/package-root.js';

const ROOT = packageRoot();
/** Where images.sh writes the agent image's archive. */
const ARCHIVE = join(CACHE, 'images', 'agent.tar');
/** The runtime stage's WORKDIR, where it copies the CLI. */
const APP = '/opt/mirrord';

/**
 * The image's uncompressed size (its layers, as `docker images` counts them) may not pass this.
 * Measured: 395 MB, of which 296 MB are the base (node:20-bookworm-slim, here built by
 * test/cluster/images.sh) and about 99 MB the runtime stage's layers (the libraries it installs,
 * mirrord's own files: about 91 MB). A C toolchain (clang and llvm alone are ~370 MB, gcc
 * ~120 MB) or the dev dependencies (~130 MB more in node_modules) would each cross it.
 */
const IMAGE_BUDGET = 448 * 2 ** 20;
/**
 * mirrord's own files in the image (the runtime stage's copies) may not pass this. Measured:
 * about 91 MB, nearly all production node_modules; the dev dependencies would more than double it.
 */
const APP_BUDGET = 128 * 2 ** 20;

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

interface ImageConfig {
  config: { Env?: string[]; Entrypoint?: string[]; Cmd?: string[]; WorkingDir?: string };
  rootfs: { diff_ids: string[] };
  history: { created_by?: string; empty_layer?: boolean }[];
}

const megabytes = (bytes: number): string => `${(bytes / 1e6).toFixed(1)} MB`;

/** A layer's uncompressed length and sha256 (its diff ID), streamed. */
async function uncompressed(
  path: string,
  gzip: boolean,
): Promise<{ size: number; digest: string }> {
  const hash = createHash('sha256');
  let size = 0;
  const input = createReadStream(path);
  const stream = gzip ? input.pipe(createGunzip()) : input;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    hash.update(chunk);
    size += chunk.length;
  }
  return { size, digest: `sha256:${hash.digest('hex')}` };
}

/** lstat of a path in the unpacked image (never following its symlinks to this machine's). */
function lstatIn(rootfs: string, path: string): Stats | undefined {
  try {
    return lstatSync(join(rootfs, path));
  } catch {
    return undefined;
  }
}

/**
 * Applies one layer to `rootfs`: its whiteouts delete what lower layers made (`.wh.NAME` a
 * path, `.wh..wh..opq` a directory's contents), then tar extracts the rest. A member whose path
 * passes through a symlink already in `rootfs` could make tar write outside it (an absolute
 * link points into this machine): layers built by buildah never have one, so it fails the test.
 */
function applyLayer(rootfs: string, blob: string, gzip: boolean): void {
  const compression = gzip ? ['-z'] : [];
  const members = execFileSync('tar', ['-t', ...compression, '-f', blob], {
    encoding: 'utf8',
    maxBuffer: 1 << 28,
  })
    .split('\n')
    .filter(Boolean)
    .map((member) => posix.normalize(member).replace(/\/$/, ''));
  const checked = new Set<string>();
  for (const member of members) {
    for (
      let dir = posix.dirname(member);
      dir !== '.' && !checked.has(dir);
      dir = posix.dirname(dir)
    ) {
      if (lstatIn(rootfs, dir)?.isSymbolicLink()) {
        throw new Error(`layer ${blob}: ${member} passes through the symlink ${dir}`);
      }
      checked.add(dir);
    }
    const name = posix.basename(member);
    const parent = posix.dirname(member);
    if (name === '.wh..wh..opq') {
      for (const child of readdirSync(join(rootfs, parent))) {
        rmSync(join(rootfs, parent, child), { recursive: true, force: true });
      }
    } else if (name.startsWith('.wh.')) {
      rmSync(join(rootfs, parent, name.slice('.wh.'.length)), { recursive: true, force: true });
    }
  }
  execFileSync('tar', [
    '-x',
    ...compression,
    '-f',
    blob,
    '-C',
    rootfs,
    '--numeric-owner',
    '--exclude=.wh.*',
  ]);
}

/** Total size of the regular files under `dir` (a hard-linked file once), symlinks not followed. */
function filesSize(dir: string, seen = new Set<number>()): number {
  let total = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) total += filesSize(path, seen);
    else if (entry.isFile()) {
      const stats = lstatSync(path);
      if (!seen.has(stats.ino)) total += stats.size;
      seen.add(stats.ino);
    }
  }
  return total;
}

describe('the agent image (docker/agent.Dockerfile, as built for the test cluster)', () => {
  let work: string;
  let rootfs: string;
  let config: ImageConfig;
  let layers: (Descriptor & { uncompressedSize: number; createdBy: string })[];
  let manifestDigest: string;

  beforeAll(async () => {
    // A test run's first Kubernetes test starts the cluster, building and importing the images.
    await ensureCluster();
    work = mkdtempSync(join(tmpdir(), 'mirrord-image-'));
    const oci = join(work, 'oci');
    rootfs = join(work, 'rootfs');
    mkdirSync(oci);
    mkdirSync(rootfs);
    execFileSync('tar', ['-x', '-f', ARCHIVE, '-C', oci]);
    const blob = (digest: string): string => join(oci, 'blobs', ...digest.split(':'));
    const index = JSON.parse(readFileSync(join(oci, 'index.json'), 'utf8')) as {
      manifests: Descriptor[];
    };
    const entry = index.manifests.find(
      (m) => m.annotations?.['org.opencontainers.image.ref.name'] === defaultAgentImage(),
    );
    if (!entry) throw new Error(`${ARCHIVE} holds no ${defaultAgentImage()}`);
    manifestDigest = entry.digest;
    const manifest = JSON.parse(readFileSync(blob(entry.digest), 'utf8')) as {
      config: Descriptor;
      layers: Descriptor[];
    };
    config = JSON.parse(readFileSync(blob(manifest.config.digest), 'utf8')) as ImageConfig;
    // History entries that made a layer, in layer order.
    const steps = config.history.filter((step) => !step.empty_layer);
    layers = [];
    for (const [i, layer] of manifest.layers.entries()) {
      const gzip = layer.mediaType === 'application/vnd.oci.image.layer.v1.tar+gzip';
      if (!gzip && layer.mediaType !== 'application/vnd.oci.image.layer.v1.tar') {
        throw new Error(`layer ${layer.digest}: media type ${layer.mediaType} is not handled`);
      }
      const { size, digest } = await uncompressed(blob(layer.digest), gzip);
      // The layer is the one the image's configuration names.
      expect(digest).toBe(config.rootfs.diff_ids[i]);
      applyLayer(rootfs, blob(layer.digest), gzip);
      layers.push({ ...layer, uncompressedSize: size, createdBy: steps[i]?.created_by ?? '?' });
    }
  }, 600_000);

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  /** The image's environment, as a container of it starts with. */
  const imageEnv = (): Record<string, string> =>
    Object.fromEntries(
      (config.config.Env ?? []).map((pair) => [
        pair.slice(0, pair.indexOf('=')),
        pair.slice(pair.indexOf('=') + 1),
      ]),
    );

  /** Runs a program of the image inside it (chroot), with the image's environment only. */
  const inImage = (args: string[]): string =>
    execFileSync('chroot', [rootfs, ...args], { encoding: 'utf8', env: imageEnv(), cwd: '/' });

  /** What a shell of the image finds on its PATH for each name (`command -v`). */
  const onPath = (names: string[]): string[] =>
    inImage([
      '/bin/sh',
      '-c',
      'for name in "$@"; do command -v "$name" || true; done',
      'sh',
      ...names,
    ])
      .split('\n')
      .filter(Boolean);

  test('is the image the cluster runs: the default agent image, with this digest in containerd', () => {
    const listed = execFileSync(
      'ctr',
      ['-a', CONTAINERD_SOCKET, '-n', 'k8s.io', 'images', 'ls', `name==${defaultAgentImage()}`],
      { encoding: 'utf8' },
    );
    const [, row = ''] = listed.trim().split('\n');
    const [ref, , digest] = row.split(/\s+/);
    expect({ ref, digest }).toEqual({ ref: defaultAgentImage(), digest: manifestDigest });
  });

  test("its entrypoint is mirrord, found on the image's PATH and running there", () => {
    expect(config.config.Entrypoint).toEqual(['mirrord']);
    expect(config.config.Cmd).toBeUndefined();
    expect(config.config.WorkingDir).toBe(APP);
    // The Job's command replaces the entrypoint: its program must be the same one.
    const job = agentJobManifest({
      sessionId: 'image',
      namespace: 'default',
      node: 'node-1',
      containerId: 'containerd://0123',
      target: 'pod/target',
      image: defaultAgentImage(),
      pullSecrets: [],
      capabilities: false,
      ttlSeconds: 60,
      idleTimeoutSeconds: 30,
      cli: { host: 'test', pid: process.pid },
    });
    const [program, subcommand] = job.spec!.template.spec!.containers[0]!.command!;
    expect(program).toBe(config.config.Entrypoint![0]);
    expect(onPath([program!, 'node'])).toEqual(['/usr/local/bin/mirrord', '/usr/local/bin/node']);
    const version = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
      version: string;
    };
    expect(inImage([program!, '--version'])).toMatch(
      new RegExp(`^mirrord/${version.version.replaceAll('.', '\\.')} linux-x64 node-v20\\.`),
    );
    expect(inImage([program!, subcommand!, '--help'])).toMatch(/--container-id/);
  });

  test('has what the agent needs: the addon (loading with its libraries), the compiled CLI, production dependencies', () => {
    // Exactly what the runtime stage copies, nothing of the build stage's work directory.
    expect(readdirSync(join(rootfs, APP)).sort()).toEqual([
      'bin',
      'build',
      'dist',
      'node_modules',
      'oclif.manifest.json',
      'package.json',
    ]);
    expect(readdirSync(join(rootfs, APP, 'build'), { recursive: true }).sort()).toEqual([
      'Release',
      'Release/mirrord_files.node',
      'Release/mirrord_netns.node',
      'Release/mirrord_resolver',
      'Release/mirrord_tap.node',
    ]);
    // The addon links libbpf and libelf, which the runtime stage installs.
    expect(
      inImage([
        'node',
        '-p',
        `Object.keys(require('${APP}/build/Release/mirrord_tap.node')).join()`,
      ]).trim(),
    ).toBe('open,deferToTarget');
    expect(
      inImage([
        'node',
        '-p',
        `Object.keys(require('${APP}/build/Release/mirrord_files.node')).join()`,
      ]).trim(),
    ).toBe('openInRoot,readLinkAt');
    expect(
      inImage([
        'node',
        '-p',
        `Object.keys(require('${APP}/build/Release/mirrord_netns.node')).join()`,
      ]).trim(),
    ).toBe('enterNetns');
    // The resolver runs in the image's libc: it starts, and says what it lacks.
    expect(
      inImage(['/bin/sh', '-c', `${APP}/build/Release/mirrord_resolver 2>&1; echo "exit $?"`]),
    ).toBe('usage: mirrord_resolver --pid PID | --netns NAME\nexit 2\n');
    for (const file of [
      'bin/run.js',
      'dist/commands/agent.js',
      'dist/agent/server.js',
      'dist/agent/tap.js',
    ]) {
      expect({ file, isFile: lstatIn(rootfs, posix.join(APP, file))?.isFile() }).toEqual({
        file,
        isFile: true,
      });
    }
    const manifest = JSON.parse(readFileSync(join(rootfs, APP, 'oclif.manifest.json'), 'utf8')) as {
      commands: Record<string, unknown>;
    };
    expect(Object.keys(manifest.commands)).toContain('agent');
    const { dependencies } = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
      dependencies: Record<string, string>;
    };
    for (const name of Object.keys(dependencies)) {
      const path = posix.join(APP, 'node_modules', name, 'package.json');
      expect({ name, present: lstatIn(rootfs, path)?.isFile() }).toEqual({ name, present: true });
    }
  });

  test('holds no build toolchain, no dev dependency and no sources', () => {
    expect(
      onPath([
        'clang',
        'llc',
        'llvm-strip',
        'gcc',
        'cc',
        'g++',
        'c++',
        'ld',
        'as',
        'make',
        'python3',
        'python',
        'bpftool',
        'pkg-config',
        'node-gyp',
        'tsc',
      ]),
    ).toEqual([]);
    const leftovers = ['usr/lib/gcc', 'usr/include/bpf', 'usr/include/libelf.h'].filter((path) =>
      lstatIn(rootfs, path),
    );
    leftovers.push(
      ...readdirSync(join(rootfs, 'usr/lib'))
        .filter((name) => name.startsWith('llvm'))
        .map((name) => `usr/lib/${name}`),
    );
    expect(leftovers).toEqual([]);

    // Whatever the lock file marks dev-only was pruned, the tools named here among them (so the
    // lock file's marks cannot silently stop covering them).
    const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as {
      packages: Record<string, { dev?: boolean }>;
    };
    const devOnly = Object.entries(lock.packages)
      .filter(([path, entry]) => path && entry.dev)
      .map(([path]) => path);
    for (const tool of ['typescript', 'jest', 'eslint', 'prettier', 'oclif', 'node-gyp']) {
      expect(devOnly).toContain(`node_modules/${tool}`);
    }
    expect(devOnly.filter((path) => lstatIn(rootfs, posix.join(APP, path)))).toEqual([]);

    // No sources: TypeScript, the BPF program, its objects and skeleton stay in the build stage
    // (the addon embeds the BPF object). Only node_modules' own files are not judged here.
    const sources = readdirSync(join(rootfs, APP), { recursive: true, encoding: 'utf8' })
      .filter((path) => path !== 'node_modules' && !path.startsWith('node_modules/'))
      .filter(
        (path) =>
          /(^|\/)(src|agent-bpf|\.output)(\/|$)/.test(path) ||
          (/\.(ts|c|h|o)$/.test(path) && !path.endsWith('.d.ts')),
      );
    expect(sources).toEqual([]);
  });

  test('states its size, within the budget', () => {
    const compressed = layers.reduce((sum, layer) => sum + layer.size, 0);
    const total = layers.reduce((sum, layer) => sum + layer.uncompressedSize, 0);
    const app =
      filesSize(join(rootfs, APP)) + lstatSync(join(rootfs, 'usr/local/bin/mirrord')).size;
    console.log(
      [
        `agent image ${defaultAgentImage()}: ${megabytes(total)} uncompressed, ` +
          `${megabytes(compressed)} to pull (gzip); mirrord's own files ${megabytes(app)}`,
        ...layers.map(
          (layer) =>
            `  ${megabytes(layer.uncompressedSize).padStart(9)}  ${layer.createdBy.slice(0, 110)}`,
        ),
      ].join('\n'),
    );
    expect(total).toBeLessThan(IMAGE_BUDGET);
    expect(app).toBeLessThan(APP_BUDGET);
  });

  test(".dockerignore keeps this checkout's build outputs out of the build context", () => {
    // The build stage copies agent-bpf/ and would take this machine's compiled BPF objects and
    // skeleton (make then sees them up to date) instead of building its own; node_modules,
    // dist and build would only slow the build down, as the stage makes its own.
    const patterns = readFileSync(join(ROOT, '.dockerignore'), 'utf8')
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line && !line.startsWith('#'));
    const inContext = (path: string): boolean => {
      let included = true;
      for (const raw of patterns) {
        const negated = raw.startsWith('!');
        const pattern = (negated ? raw.slice(1) : raw).replace(/\/$/, '');
        if (pattern !== '*' && /[*?[\]]/.test(pattern)) {
          throw new Error(`.dockerignore pattern this test cannot judge: ${raw}`);
        }
        if (pattern === '*' || path === pattern || path.startsWith(`${pattern}/`)) {
          included = negated;
        }
      }
      return included;
    };
    expect(existsSync(join(ROOT, 'agent-bpf', '.output'))).toBe(true);
    expect(
      ['agent-bpf/.output', 'node_modules', 'dist', 'build'].filter((path) => inContext(path)),
    ).toEqual([]);
    expect(inContext('agent-bpf/Makefile')).toBe(true);
  });
});
