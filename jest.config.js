// Tests are ESM (like the CLI) and run TypeScript through swc; they touch real namespaces and
// the kernel's BPF state, so files run one at a time.
export default {
  testEnvironment: 'node',
  extensionsToTreatAsEsm: ['.ts'],
  transform: {
    '^.+\\.ts$': ['@swc/jest', { jsc: { target: 'es2022', parser: { syntax: 'typescript' } } }],
  },
  moduleNameMapper: { '^(\\.{1,2}/.*)\\.js$': '$1' },
  testMatch: ['<rootDir>/test/**/*.test.ts', '<rootDir>/extension/test/**/*.test.ts'],
  maxWorkers: 1,
  setupFilesAfterEnv: ['<rootDir>/test/support/hygiene.ts'],
  // The first Kubernetes test starts the real test cluster; it stays up for the others.
  globalTeardown: '<rootDir>/test/cluster/teardown.mjs',
  testTimeout: 120000,
};
