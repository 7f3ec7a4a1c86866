/**
 * Names resolved as the target resolves them (src/features/outgoing/resolver.ts): real network
 * namespaces with files of their own in /etc/netns/NAME/ (as `ip netns exec` shows them), a real
 * nameserver (dnsmasq) inside one, a nameserver that never answers in another, and a target
 * chrooted in a mount namespace of its own.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { lookup } from 'node:dns/promises';
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmdirSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { Writable } from 'node:stream';
import { promisify } from 'node:util';
import type { TapNetns } from '../src/agent/tap.js';
import { TargetResolver } from '../src/features/outgoing/resolver.js';
import { packageRoot } from '../src/package-root.js';
import { deleteNetns, isStale, netnsName } from '../src/platform/local/netns.js';
import { startChrootedTarget } from './support/chrooted-target.js';
import { tempDir } from './support/mirror-cli.js';
import { SANDBOX_PREFIX } from './support/sandbox.js';
import { waitFor } from './support/wait.js';

const execFileAsync = promisify(execFile);
const ETC_NETNS = '/etc/netns';
const RESOLVER = join(packageRoot(), 'build', 'Release', 'mirrord_resolver');
const NAMESERVER = '10.213.231.1';
/** In the slow netns' subnet, on a MAC no one has: its queries vanish, with no ICMP error. */
const SILENT_NAMESERVER = '10.213.232.53';
const BULK = 200;

/** The pids of resolver programs started with `argument` (a zombie has no command line). */
function resolversWith(argument: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      if (argv[0] === RESOLVER && argv.includes(argument)) pids.push(Number(entry));
    } catch {
      // Gone meanwhile.
    }
  }
  return pids;
}

function parentOf(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}

describe('names resolved as the target resolves them', () => {
  const dir = tempDir('resolver');
  const made: string[] = [];
  const resolvers: TargetResolver[] = [];
  let dns = '';
  let slow = '';
  let dnsmasq: ChildProcess | undefined;
  let chrooted: ChildProcess | undefined;

  const resolverFor = (target: TapNetns): TargetResolver => {
    const resolver = new TargetResolver(target);
    resolvers.push(resolver);
    return resolver;
  };

  /** A netns with lo up and a veth pair inside it, veth0 at `address`/24, and /etc/netns files. */
  const makeNetns = (address: string, files: Record<string, string>): string => {
    const name = netnsName(SANDBOX_PREFIX, 'resolver');
    made.push(name);
    const ip = (...args: string[]) => execFileSync('ip', ['-n', name, ...args]);
    execFileSync('ip', ['netns', 'add', name]);
    ip('link', 'set', 'lo', 'up');
    ip('link', 'add', 'veth0', 'type', 'veth', 'peer', 'name', 'veth1');
    ip('addr', 'add', `${address}/24`, 'dev', 'veth0');
    ip('link', 'set', 'veth0', 'up');
    ip('link', 'set', 'veth1', 'up');
    mkdirSync(join(ETC_NETNS, name), { recursive: true });
    for (const [file, text] of Object.entries(files)) {
      writeFileSync(join(ETC_NETNS, name, file), text);
    }
    return name;
  };

  beforeAll(async () => {
    // The hygiene setup removes a killed run's namespaces; their /etc/netns files go here.
    if (existsSync(ETC_NETNS)) {
      for (const name of readdirSync(ETC_NETNS)) {
        if (name.startsWith(SANDBOX_PREFIX) && isStale(name)) {
          rmSync(join(ETC_NETNS, name), { recursive: true, force: true });
        }
      }
    }
    const bulk = Array.from({ length: BULK }, (_, i) => `10.213.78.${i + 1} bulk-${i}.test\n`);
    dns = makeNetns(NAMESERVER, {
      hosts: [
        '10.213.77.7 only-in-target.test\n',
        '10.213.77.8 twice.test\n10.213.77.9 twice.test\n10.213.77.8 twice.test\n',
        ...bulk,
      ].join(''),
      'resolv.conf': `nameserver ${NAMESERVER}\nsearch staging.svc\n`,
    });
    slow = makeNetns('10.213.232.1', {
      hosts: '10.213.77.17 quick.test\n',
      'resolv.conf': `nameserver ${SILENT_NAMESERVER}\noptions timeout:5 attempts:1\n`,
    });
    const neighbour = ['lladdr', '02:00:00:00:02:53', 'dev', 'veth0', 'nud', 'permanent'];
    execFileSync('ip', ['-n', slow, 'neigh', 'add', SILENT_NAMESERVER, ...neighbour]);

    const options = [
      '--no-daemon',
      '--conf-file=/dev/null',
      '--no-resolv',
      '--no-hosts',
      `--listen-address=${NAMESERVER}`,
      '--bind-interfaces',
      '--port=53',
      '--address=/db.staging.svc/10.213.88.8',
      // Every other name is NXDOMAIN rather than REFUSED (it has no upstream to ask).
      '--local=/#/',
    ];
    const server = spawn('ip', ['netns', 'exec', dns, 'dnsmasq', ...options], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    dnsmasq = server;
    let log = '';
    server.stderr!.on('data', (chunk: Buffer) => (log += chunk.toString()));
    await waitFor(
      'dnsmasq to answer',
      async () => {
        if (server.exitCode !== null) throw new Error(`dnsmasq exited: ${log}`);
        const dig = ['+short', '+time=1', '+tries=1', `@${NAMESERVER}`, 'db.staging.svc'];
        try {
          const { stdout } = await execFileAsync('ip', ['netns', 'exec', dns, 'dig', ...dig]);
          return stdout.trim() === '10.213.88.8';
        } catch {
          return false;
        }
      },
      { ms: 20_000 },
    );
  }, 60_000);

  afterAll(() => {
    for (const resolver of resolvers) resolver.close();
    dnsmasq?.kill('SIGKILL');
    chrooted?.kill('SIGKILL');
    for (const name of made) {
      deleteNetns(name);
      rmSync(join(ETC_NETNS, name), { recursive: true, force: true });
    }
    try {
      rmdirSync(ETC_NETNS);
    } catch {
      // Another test's files are in it.
    }
    dir.remove();
  });

  test('a name only the target’s /etc/hosts has resolves; not on this machine', async () => {
    const resolver = resolverFor({ netns: dns });
    expect(await resolver.resolve('only-in-target.test', 0)).toEqual({
      error: null,
      canonicalName: 'only-in-target.test',
      addresses: ['10.213.77.7'],
    });
    await expect(lookup('only-in-target.test')).rejects.toThrow();
    // In getaddrinfo's order, each once: what a program the target's way sees, without repeats.
    const seen = execFileSync('ip', ['netns', 'exec', dns, 'getent', 'ahosts', 'twice.test'], {
      encoding: 'utf8',
    })
      .split('\n')
      .filter(Boolean)
      .map((line) => line.split(/\s+/)[0]!);
    expect((await resolver.resolve('twice.test', 4)).addresses).toEqual([...new Set(seen)]);
    expect([...new Set(seen)]).toHaveLength(2);
  });

  test('a short name resolves through the target’s nameserver and search domains', async () => {
    const resolver = resolverFor({ netns: dns });
    const db = { error: null, canonicalName: 'db.staging.svc', addresses: ['10.213.88.8'] };
    expect(await resolver.resolve('db', 0)).toEqual(db);
    expect(await resolver.resolve('db', 4)).toEqual(db);
    expect(await resolver.resolve('nothing-here', 0)).toEqual({
      error: 'NONAME',
      canonicalName: null,
      addresses: [],
    });
  });

  test('a chrooted target’s own /etc/hosts is used through its pid', async () => {
    const root = join(dir.path, 'root');
    mkdirSync(join(root, 'etc'), { recursive: true });
    writeFileSync(join(root, 'etc', 'hosts'), '10.213.99.9 only-in-chroot.test\n');
    chrooted = await startChrootedTarget(root, []);
    expect(await resolverFor({ pid: chrooted.pid! }).resolve('only-in-chroot.test', 4)).toEqual({
      error: null,
      canonicalName: 'only-in-chroot.test',
      addresses: ['10.213.99.9'],
    });
  });

  test(`${BULK} look-ups at once are all answered`, async () => {
    const resolver = resolverFor({ netns: dns });
    const names = Array.from({ length: BULK }, (_, i) => `bulk-${i}.test`);
    const answers = await Promise.all(names.map((name) => resolver.resolve(name, 0)));
    expect(answers.map((answer) => answer.addresses)).toEqual(
      names.map((_, i) => [`10.213.78.${i + 1}`]),
    );
  });

  test('a look-up does not wait for one whose nameserver does not answer', async () => {
    const resolver = resolverFor({ netns: slow });
    const order: string[] = [];
    const stuck = resolver.resolve('slow.example', 4).then((answer) => {
      order.push('slow');
      return answer;
    });
    const quick = await resolver.resolve('quick.test', 4);
    order.push('quick');
    expect(quick.addresses).toEqual(['10.213.77.17']);
    expect((await stuck).error).toBe('AGAIN');
    expect(order).toEqual(['quick', 'slow']);
  });

  test('a program that dies answers FAIL to what it owed; the next look-up starts another', async () => {
    const resolver = resolverFor({ netns: slow });
    const before = new Set(resolversWith(slow));
    const stuck = resolver.resolve('slow.example', 4);
    const [pid] = resolversWith(slow).filter((p) => !before.has(p));
    process.kill(pid!, 'SIGKILL');
    expect(await stuck).toEqual({ error: 'FAIL', canonicalName: null, addresses: [] });
    expect((await resolver.resolve('quick.test', 0)).addresses).toEqual(['10.213.77.17']);
    expect(resolversWith(slow).filter((p) => !before.has(p))).not.toContain(pid);
  });

  test('a target it cannot enter rejects with what failed', async () => {
    await expect(resolverFor({ pid: 99_999_999 }).resolve('a.test', 0)).rejects.toThrow(
      'mirrord_resolver: cannot open /proc/99999999/ns/net: No such file or directory',
    );
    const missing = `${SANDBOX_PREFIX}-resolver-missing`;
    await expect(resolverFor({ netns: missing }).resolve('a.test', 0)).rejects.toThrow(
      `cannot open /run/netns/${missing}`,
    );
  });

  test('names with whitespace or over 253 bytes are NONAME without asking', async () => {
    // A missing netns: had the program been asked, the look-up would have been rejected.
    const resolver = resolverFor({ netns: `${SANDBOX_PREFIX}-resolver-missing` });
    const noName = { error: 'NONAME', canonicalName: null, addresses: [] };
    expect(await resolver.resolve('a b', 0)).toEqual(noName);
    expect(await resolver.resolve('a\tb', 0)).toEqual(noName);
    expect(await resolver.resolve(`${'a'.repeat(63)}.`.repeat(4).slice(0, 254), 0)).toEqual(noName);
  });

  test('the program dies with its parent, even with its input still open', async () => {
    // sh starts it with its stdin on our fd 3 and becomes sleep: killing sleep is the parent's
    // death while this process keeps the program's input open (no end of input to end it).
    const parent = spawn('sh', ['-c', '"$0" --netns "$1" <&3 & exec sleep 3600', RESOLVER, dns], {
      stdio: ['ignore', 'pipe', 'inherit', 'pipe'],
    });
    const input = parent.stdio[3] as Writable;
    try {
      const lines = createInterface({ input: parent.stdout! })[Symbol.asyncIterator]();
      input.write('1 4 only-in-target.test\n');
      expect((await lines.next()).value).toBe('1 ok only-in-target.test 10.213.77.7');
      const [pid] = resolversWith(dns).filter((p) => parentOf(p) === parent.pid);
      expect(pid).toBeDefined();
      parent.kill('SIGKILL');
      await waitFor(
        'the resolver to die with its parent',
        () => !resolversWith(dns).includes(pid!),
      );
    } finally {
      input.destroy();
      parent.kill('SIGKILL');
    }
  });

  test('close() answers FAIL to what is under way and leaves no process behind', async () => {
    const resolver = resolverFor({ netns: slow });
    const before = new Set(resolversWith(slow));
    const stuck = resolver.resolve('slow.example', 4);
    const started = resolversWith(slow).filter((p) => !before.has(p));
    expect(started).toHaveLength(1);
    resolver.close();
    expect((await stuck).error).toBe('FAIL');
    await waitFor('the resolver to be gone', () => !resolversWith(slow).includes(started[0]!));
  });
});
