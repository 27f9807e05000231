"""The audit's ORM app: shapes whose blocking line is not the innermost frame of the app's:
an app-owned WSGI middleware around an ORM view, a lazy relationship read in a Jinja template
(the N+1), and a template that computes. psycopg2 unpatched, as most apps start.

    TABLE_PREFIX=demo_ python audit.py audit_orm_app:app --chdir tests

Reads DATABASE_URL and TABLE_PREFIX; creates its two tables, named with the prefix, at start.
"""

import os
import time

from flask import Flask, jsonify, render_template
from sqlalchemy import ForeignKey, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

PREFIX = os.environ.get("TABLE_PREFIX", "audit_orm_")
engine = create_engine(os.environ["DATABASE_URL"].replace("postgresql://",
                                                          "postgresql+psycopg2://", 1))
app = Flask(__name__, template_folder="audit_templates")


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = f"{PREFIX}author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list["Book"]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = f"{PREFIX}book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey(Author.id))
    author: Mapped[Author] = relationship(back_populates="books")


Base.metadata.create_all(engine)
with Session(engine) as setup, setup.begin():
    if not setup.scalar(select(func.count(Author.id))):
        setup.add_all(Author(name=f"a{i}", books=[Book(), Book()]) for i in range(5))


class Timing:
    """The app's own middleware: every request passes through it."""

    def __init__(self, wsgi):
        self.wsgi = wsgi

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        try:
            return self.wsgi(environ, start_response)
        finally:
            environ["app.took"] = time.perf_counter() - started


app.wsgi_app = Timing(app.wsgi_app)


@app.get("/count/")
def count():
    with Session(engine) as session:
        return jsonify(authors=session.scalar(select(func.count(Author.id))))


@app.get("/authors/")
def authors():
    with Session(engine) as session:
        return render_template("authors.html", authors=session.scalars(select(Author)).all())


@app.get("/cpu-template/")
def cpu_template():
    return render_template("numbers.html", numbers=range(150_000))
