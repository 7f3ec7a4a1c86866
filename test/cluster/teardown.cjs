// jest's globalTeardown: the cluster a test of this run started goes with the run. Plain
// CommonJS that runs stop.sh: jest loads global hooks with Node's own resolution, which cannot
// follow the TypeScript sources' `.js` import specifiers.
const { execFileSync } = require('node:child_process');
const { join } = require('node:path');

module.exports = function teardown() {
  execFileSync('bash', [join(__dirname, 'stop.sh'), '--if-owner', String(process.pid)], {
    stdio: 'inherit',
  });
};
