"""A small app the way real ones are written, for the audit of issue 27: Flask-Login sessions,
a login that hashes a password, a page behind the login, an API behind a bearer token, and a
form that writes a row. It runs in its own virtualenv (requirements.txt beside it).

    python audit.py microblog:app --chdir tests/real_app --python VENV/bin/python \\
        --login /auth/login --data 'username=demo&password=demo'

Reads DATABASE_URL (handed to SQLAlchemy as it is: name the driver, postgresql+psycopg2://),
SECRET_KEY, and TABLE_PREFIX (its tables' names start with it, so that runs side by side
keep apart).
"""

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import hashlib  # noqa: E402
import hmac  # noqa: E402
import os  # noqa: E402

from flask import Flask, abort, jsonify, redirect, request  # noqa: E402
from flask_login import (LoginManager, UserMixin, current_user, login_required,  # noqa: E402
                         login_user)
from sqlalchemy import ForeignKey, create_engine, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402
from werkzeug.security import check_password_hash, generate_password_hash  # noqa: E402

PREFIX = os.environ.get("TABLE_PREFIX", "microblog_")
SECRET = os.environ.get("SECRET_KEY", "not-a-secret")


class Base(DeclarativeBase):
    pass


class User(UserMixin, Base):
    __tablename__ = f"{PREFIX}users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(unique=True)
    password_hash: Mapped[str]

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)  # scrypt, in C


class Post(Base):
    __tablename__ = f"{PREFIX}posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey(f"{PREFIX}users.id"))
    body: Mapped[str]


engine = create_engine(os.environ["DATABASE_URL"], pool_size=10, pool_pre_ping=True)
Base.metadata.create_all(engine)
with Session(engine) as session, session.begin():
    if session.scalar(select(User).where(User.username == "demo")) is None:
        session.add(User(username="demo", password_hash=generate_password_hash("demo")))

app = Flask(__name__)
app.secret_key = SECRET
login_manager = LoginManager(app)
login_manager.login_view = "login_form"


@login_manager.user_loader
def load_user(user_id: str):
    with Session(engine) as session:
        return session.get(User, int(user_id))


def token_for(username: str) -> str:
    return username + "." + hmac.new(SECRET.encode(), username.encode(),
                                     hashlib.sha256).hexdigest()


def authenticate(username: str, password: str) -> User | None:
    with Session(engine) as session:
        user = session.scalar(select(User).where(User.username == username))
        return user if user is not None and user.check_password(password) else None


@app.get("/health")
def health():
    return jsonify(status="ok")


@app.get("/auth/login")
def login_form():
    return '<form method="post"><input name="username"><input name="password"></form>'


@app.post("/auth/login")
def login():
    user = authenticate(request.form.get("username", ""), request.form.get("password", ""))
    if user is None:
        return "wrong user name or password", 401
    login_user(user)
    return redirect("/index")


@app.get("/index")
@login_required
def index():
    with Session(engine) as session:
        posts = session.scalars(select(Post).where(Post.user_id == current_user.id)
                                .order_by(Post.id.desc()).limit(20)).all()
        return jsonify(user=current_user.username, posts=[p.body for p in posts])


@app.get("/explore")
@login_required
def explore():
    with Session(engine) as session:
        return jsonify(posts=[p.body for p in session.scalars(
            select(Post).order_by(Post.id.desc()).limit(20))])


@app.post("/post")
@login_required
def write_post():
    with Session(engine) as session, session.begin():
        session.add(Post(user_id=current_user.id, body=request.form.get("body", "")))
    return redirect("/index")


@app.post("/api/tokens")
def tokens():
    given = request.get_json(silent=True) or {}
    user = authenticate(given.get("username", ""), given.get("password", ""))
    if user is None:
        abort(401)
    return jsonify(token=token_for(user.username))


@app.get("/api/users")
def users():
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    name = token.split(".")[0]
    if scheme != "Bearer" or not hmac.compare_digest(token, token_for(name)):
        return jsonify(error="a bearer token is needed"), 401, {"WWW-Authenticate": "Bearer"}
    with Session(engine) as session:
        return jsonify(users=[u.username for u in session.scalars(select(User))])
