// A tiny auth module for the demo: `python ide.py --workspace examples/demo "Add logging to src/auth.js"`
const users = new Map([["ada", "s3cret"]]);

function login(name, password) {
  const ok = users.get(name) === password;
  return ok ? { name, token: `t-${name}` } : null;
}

function logout(session) {
  session.token = null;
  return true;
}

module.exports = { login, logout };
