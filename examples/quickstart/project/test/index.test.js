'use strict';

const test = require('node:test');
const assert = require('node:assert');
const { add, slugify } = require('../index.js');

test('add adds', () => {
  assert.strictEqual(add(2, 3), 5);
});

test('slugify makes URL slugs', () => {
  assert.strictEqual(slugify('Agent PR #482: Fix it!'), 'agent-pr-482-fix-it');
});
