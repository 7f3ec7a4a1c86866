/**
 * The debuggee's environment in resolved debug configurations: Node (js-debug), Python
 * (debugpy), a generic `env` debugger (Go), the C/C++ debuggers' `environment` list, and an
 * attach configuration, which cannot join.
 */
import {
  unjoinable,
  withSessionEnvironment,
  type DebugConfigurationLike,
} from '../src/debug-environment.js';

/** What `mirrord session` prints in its join line, in form. */
const SESSION = {
  LD_PRELOAD: '/repo/layer/.output/mirrord_layer.so',
  MIRRORD_LAYER_SOCKET: '/tmp/mirrord-layer-1-x/layer.sock',
  MIRRORD_LAYER_TOKEN: 'abc',
  DATABASE_URL: 'postgres://db.staging:5432/app',
};

const launch = (type: string, extra: Record<string, unknown> = {}): DebugConfigurationLike => ({
  type,
  request: 'launch',
  name: `${type} app`,
  ...extra,
});

describe('withSessionEnvironment', () => {
  test('node: the session goes into env, the configuration keeps its own keys', () => {
    const resolved = withSessionEnvironment(
      launch('node', {
        program: '/w/server.js',
        env: { PORT: '8080' },
        console: 'internalConsole',
      }),
      SESSION,
    );
    expect(resolved).toEqual({
      ...launch('node', { program: '/w/server.js', console: 'internalConsole' }),
      env: { PORT: '8080', ...SESSION },
    });
  });

  test("node: a variable the configuration sets wins over the target's", () => {
    const resolved = withSessionEnvironment(
      launch('pwa-node', { env: { DATABASE_URL: 'postgres://localhost/app' } }),
      SESSION,
    );
    expect(resolved.env).toEqual({ ...SESSION, DATABASE_URL: 'postgres://localhost/app' });
  });

  test("node: the layer is preloaded first, the configuration's own preloads after it", () => {
    const resolved = withSessionEnvironment(
      launch('node', {
        env: { LD_PRELOAD: '/usr/lib/libjemalloc.so:/repo/layer/.output/mirrord_layer.so' },
      }),
      SESSION,
    );
    expect((resolved.env as Record<string, string>).LD_PRELOAD).toBe(
      '/repo/layer/.output/mirrord_layer.so:/usr/lib/libjemalloc.so',
    );
  });

  test('python: debugpy takes env the same way, made when the configuration has none', () => {
    for (const type of ['python', 'debugpy']) {
      const configuration = launch(type, { program: '${file}', justMyCode: true });
      const resolved = withSessionEnvironment(configuration, SESSION);
      expect(resolved).toEqual({ ...configuration, env: SESSION });
      // The configuration VS Code handed over is not changed in place.
      expect(configuration.env).toBeUndefined();
    }
  });

  test('a generic debugger with env (go) gets env', () => {
    const resolved = withSessionEnvironment(launch('go', { mode: 'debug', env: null }), SESSION);
    expect(resolved.env).toEqual(SESSION);
  });

  test('a debugger with an environment list (cppdbg) gets entries in it', () => {
    const resolved = withSessionEnvironment(
      launch('cppdbg', {
        program: '/w/a.out',
        environment: [
          { name: 'DATABASE_URL', value: 'local' },
          { name: 'LD_PRELOAD', value: '/usr/lib/libasan.so' },
        ],
      }),
      SESSION,
    );
    expect(resolved.env).toBeUndefined();
    expect(resolved.environment).toEqual([
      { name: 'DATABASE_URL', value: 'local' },
      { name: 'LD_PRELOAD', value: '/repo/layer/.output/mirrord_layer.so:/usr/lib/libasan.so' },
      { name: 'MIRRORD_LAYER_SOCKET', value: SESSION.MIRRORD_LAYER_SOCKET },
      { name: 'MIRRORD_LAYER_TOKEN', value: SESSION.MIRRORD_LAYER_TOKEN },
    ]);
  });
});

describe('unjoinable', () => {
  test('a launch configuration joins, of any type', () => {
    for (const type of ['node', 'python', 'go', 'cppdbg', 'anything']) {
      expect(unjoinable(launch(type))).toBeUndefined();
    }
  });

  test('an attach configuration cannot, and is told why', () => {
    expect(unjoinable({ type: 'node', request: 'attach', name: 'Attach to API', port: 9229 })).toBe(
      '"Attach to API" attaches to a process that runs already: only a process the debugger launches joins a mirrord session',
    );
  });
});
