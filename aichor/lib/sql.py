"""Queries the ORM cannot say."""

from django.db import connection, models


def distinct_values(model: type[models.Model], column: str, where: str, value) -> list:
    """The distinct non-null values of `column` among the rows of `model` whose `where` column is
    `value`, in order: a loose index scan (the next value after the last one found), one index
    probe per value, where DISTINCT or a count reads every row. Needs an index on (where, column)."""
    table = connection.ops.quote_name(model._meta.db_table)
    column, where = connection.ops.quote_name(column), connection.ops.quote_name(where)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""WITH RECURSIVE found(value) AS (
                SELECT MIN({column}) FROM {table} WHERE {where} = %s
                UNION ALL
                SELECT (SELECT MIN({column}) FROM {table} WHERE {where} = %s AND {column} > found.value)
                FROM found WHERE found.value IS NOT NULL
            )
            SELECT value FROM found WHERE value IS NOT NULL ORDER BY value""",
            [value, value],
        )
        return [found for (found,) in cursor.fetchall()]
